//! iSCSI (RFC 7143) with the SPC-4/SBC-3 command sets: the front end open-iscsi and libiscsi connect to.
