//! PostgreSQL wire protocol pieces dbproxy needs on top of postgres-protocol.

pub mod backend;
pub mod framing;
pub mod frontend;
pub mod startup;
