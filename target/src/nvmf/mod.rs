//! NVMe over Fabrics, TCP transport: the front end Linux nvme-tcp hosts connect to.
