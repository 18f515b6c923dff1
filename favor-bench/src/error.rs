//! The tool's error: a message for the user, naming the file or option at fault.

use std::fmt;

/// An error of the favor-bench tool: what went wrong, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchError(pub String);

/// Result alias of the tool.
pub type Result<T, E = BenchError> = std::result::Result<T, E>;

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BenchError {}

impl From<favor_core::FavorError> for BenchError {
    fn from(e: favor_core::FavorError) -> Self {
        BenchError(e.to_string())
    }
}

impl From<std::io::Error> for BenchError {
    fn from(e: std::io::Error) -> Self {
        BenchError(e.to_string())
    }
}

/// Builds a [`BenchError`] from format arguments.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::BenchError(format!($($arg)*)))
    };
}

/// Adds context (a file name, a step) in front of an error message.
pub trait Context<T> {
    /// Prefixes the error with `what: `.
    fn context(self, what: impl fmt::Display) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| BenchError(format!("{what}: {e}")))
    }
}
