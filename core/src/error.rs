use std::path::PathBuf;

/// Errors from plugins and the pieces that connect them. Every variant says
/// which component, key or file it concerns, so the message alone tells a user
/// what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is missing, unknown, or of the wrong type.
    #[error("{0}")]
    Config(String),
    /// A plugin was asked for something it cannot do with its inputs.
    #[error("plugin `{plugin}`: {message}")]
    Plugin { plugin: String, message: String },
    /// Input data is unreadable or malformed.
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Data {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// The run stopped on request (SIGTERM, SIGINT: `signal`) after saving
    /// its state.
    #[error("{message}")]
    Stopped { signal: i32, message: String },
    /// Training met a non-finite loss or gradient norm.
    #[error("{0}")]
    NonFinite(String),
    /// Another rank of a data-parallel run failed at work this rank waited
    /// for (rank 0 writing a checkpoint or evaluating), or stopped while
    /// this rank waited: `message` names it and says why.
    #[error("{message}")]
    Peer { rank: usize, message: String },
}

impl Error {
    pub fn plugin(plugin: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Plugin {
            plugin: plugin.into(),
            message: message.into(),
        }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
