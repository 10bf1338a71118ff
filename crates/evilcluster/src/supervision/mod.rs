//! Supervision: the policy types (`policy`), the engine (`supervisor`), a worker's
//! declaration (`worker`), and launching child processes (`process`).
//! May use: the node, the API layer, the shared listener and output relay.

pub(crate) mod policy;
pub(crate) mod process;
pub(crate) mod supervisor;
pub(crate) mod worker;
