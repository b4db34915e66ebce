//! Tests that need lab hardware (an NVMe device, an RDMA NIC). Each test reads
//! its device from the environment and is skipped, saying so, when unset.
