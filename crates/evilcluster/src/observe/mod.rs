//! Observability: the control endpoint the CLI speaks to, the live status
//! with each process's counters, and the rendered tree.
//! May use: the node, the API layer, supervision.

pub(crate) mod control;
pub(crate) mod tree;
