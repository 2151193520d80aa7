//! Errors a user can act on; none of them ever carries a password or raw DSN text.

/// Why a DSN could not be parsed. Messages name the problem and the keyword, never a value
/// that could be a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DsnError {
    /// Placeholder until the parser lands (issue 2).
    #[error("invalid connection string: {0}")]
    Invalid(String),
}
