//! SCSI (SPC-4 / SBC-3) on mirrorpoint volumes: the command set behind the
//! iSCSI front end, kept apart from iSCSI so that it depends only on the
//! volume API and could serve another SCSI transport later.
//!
//! [`task`] is the contract between a SCSI transport and this layer: the
//! transport hands over a CDB with its Data-Out already collected into pool
//! buffers, and gets back a status, sense data and Data-In buffers.

pub mod task;
