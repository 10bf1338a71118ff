//! Addressing and messaging: typed addresses (`addr`), remote actor and
//! message declarations (`remote`), events, watching a name, lifecycle
//! events and roles. Built on the node alone; the registry, supervision,
//! observability and the runtime use it.
//!
//! May use: the node.

pub(crate) mod addr;
pub(crate) mod events;
pub(crate) mod lifecycle;
pub(crate) mod pipeline;
pub(crate) mod remote;
pub(crate) mod role;
pub(crate) mod shared_bytes;
pub(crate) mod watch;
