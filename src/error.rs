//! Errors of the core, each mapped to the Python exception a user expects.

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::PyErr;

/// What can go wrong in the core. Every public entry point returns `Result<_, Error>`;
/// the bindings turn it into a Python exception naming what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A value or shape the user passed is not acceptable (Python `ValueError`).
    #[error("{0}")]
    Value(String),
    /// A tensor of the wrong dtype or a wrong kind of object (Python `TypeError`).
    #[error("{0}")]
    Type(String),
    /// libtorch refused an operation (Python `RuntimeError`).
    #[error("libtorch: {0}")]
    Torch(String),
}

impl From<tch::TchError> for Error {
    fn from(e: tch::TchError) -> Self {
        Error::Torch(e.to_string())
    }
}

impl From<Error> for PyErr {
    fn from(e: Error) -> Self {
        match e {
            Error::Value(m) => PyValueError::new_err(m),
            Error::Type(m) => PyTypeError::new_err(m),
            Error::Torch(m) => PyRuntimeError::new_err(m),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// `Err(Error::Value(..))` from a format string.
macro_rules! value_err {
    ($($arg:tt)*) => { Err($crate::error::Error::Value(format!($($arg)*))) };
}
pub(crate) use value_err;
