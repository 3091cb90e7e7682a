//! The engine's errors: values, never panics. The root crate's bindings map them to
//! Python exceptions (`ovsw::error`).

/// What can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A value, shape or file the caller passed is not acceptable (Python `ValueError`).
    #[error("{0}")]
    Value(String),
    /// The operating system refused a file operation (Python `OSError`).
    #[error("{message}")]
    Io {
        message: String,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// `Err(Error::Value(..))` from a format string.
macro_rules! value_err {
    ($($arg:tt)*) => { Err($crate::error::Error::Value(format!($($arg)*))) };
}
pub(crate) use value_err;
