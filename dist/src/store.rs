//! The c10d TCPStore the ranks of a run share: rendezvous, heartbeats and
//! small values.

use std::sync::Arc;
use std::time::Duration;

use crate::ffi::{Failure, StoreHandle};
use crate::{DistError, LaunchEnv, Result};

/// Who serves a [`Store`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreServer {
    /// Rank 0 (its process runs the server): [`Store::connect`].
    Rank0,
    /// Someone else, such as torchrun's agent (`TORCHELASTIC_USE_AGENT_STORE`):
    /// [`Store::connect_client`].
    External,
}

/// A c10d TCPStore shared by all ranks: rank 0 serves it (or a launcher
/// does), every rank (rank 0 included) is a client. Cheap to clone; all
/// clones are one connection, safe to use from several threads.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<StoreHandle>,
    rank: usize,
    host: String,
    port: u16,
    server: StoreServer,
    /// The key prefix of [`Store::prefixed`], reapplied by
    /// [`Store::new_connection`].
    prefix: Option<String>,
}

impl Store {
    /// Serves (rank 0) or connects to (other ranks) the store at
    /// `host:port`. Rank 0 waits up to `timeout` for all `world_size` ranks
    /// to connect; the others retry connecting for up to `timeout`.
    pub fn connect(
        host: &str,
        port: u16,
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<Store> {
        let invalid = |detail: String| DistError::InvalidArgument {
            rank,
            what: format!("store at {host}:{port}"),
            detail,
        };
        let world = i32::try_from(world_size)
            .ok()
            .filter(|w| *w >= 1)
            .ok_or_else(|| invalid(format!("world size {world_size} is not in 1..=i32::MAX")))?;
        if rank >= world_size {
            return Err(invalid(format!(
                "rank {rank} is not below the world size {world_size}"
            )));
        }
        Store::open(host, port, rank, world, StoreServer::Rank0, timeout)
    }

    /// Connects every rank, rank 0 included, as a client to a store that
    /// someone else serves at `host:port`: torchrun's agent when it sets
    /// `TORCHELASTIC_USE_AGENT_STORE=True` (then rank 0 cannot serve: the
    /// agent holds the port). Retries for up to `timeout`.
    pub fn connect_client(
        host: &str,
        port: u16,
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<Store> {
        let world = i32::try_from(world_size)
            .ok()
            .filter(|w| *w >= 1 && rank < world_size)
            .ok_or_else(|| DistError::InvalidArgument {
                rank,
                what: format!("store at {host}:{port}"),
                detail: format!("rank {rank} is not below the world size {world_size}"),
            })?;
        Store::open(host, port, rank, world, StoreServer::External, timeout)
    }

    fn open(
        host: &str,
        port: u16,
        rank: usize,
        world: i32,
        server: StoreServer,
        timeout: Duration,
    ) -> Result<Store> {
        let serve = server == StoreServer::Rank0 && rank == 0;
        let inner = StoreHandle::tcp(host, port, world, serve, timeout).map_err(|f| {
            DistError::Rendezvous {
                rank,
                action: if serve { "serve" } else { "connect to" },
                host: host.to_string(),
                port,
                timeout,
                detail: f.message().to_string(),
            }
        })?;
        Ok(Store {
            inner: Arc::new(inner),
            rank,
            host: host.to_string(),
            port,
            server,
            prefix: None,
        })
    }

    /// This store with every key put under `prefix/` (c10d's PrefixStore),
    /// sharing the connection; connections opened from it later get the
    /// same prefix. Under torchrun the attempt number
    /// (`TORCHELASTIC_RESTART_COUNT`) keeps a restarted run from reading
    /// the keys of the attempt before it.
    pub fn prefixed(&self, prefix: &str) -> Result<Store> {
        let inner = self
            .inner
            .prefixed(prefix)
            .map_err(|f| self.store_error("prefix", prefix, f))?;
        Ok(Store {
            inner: Arc::new(inner),
            prefix: Some(match &self.prefix {
                Some(outer) => format!("{outer}/{prefix}"),
                None => prefix.to_string(),
            }),
            ..self.clone()
        })
    }

    /// Who serves this store.
    pub fn server(&self) -> StoreServer {
        self.server
    }

    /// The address of the store's server.
    pub fn address(&self) -> (&str, u16) {
        (&self.host, self.port)
    }

    /// A second client connection to the same store, for a thread whose
    /// requests must not queue behind this connection's blocking waits
    /// (the [`Heartbeat`](crate::Heartbeat)). Rank 0's connection still needs the server that
    /// the original connection of rank 0 runs.
    pub fn new_connection(&self, timeout: Duration) -> Result<Store> {
        let inner = StoreHandle::tcp_client(&self.host, self.port, timeout).map_err(|f| {
            DistError::Rendezvous {
                rank: self.rank,
                action: "connect to",
                host: self.host.clone(),
                port: self.port,
                timeout,
                detail: f.message().to_string(),
            }
        })?;
        let inner = match &self.prefix {
            Some(prefix) => inner
                .prefixed(prefix)
                .map_err(|f| self.store_error("prefix", prefix, f))?,
            None => inner,
        };
        Ok(Store {
            inner: Arc::new(inner),
            ..self.clone()
        })
    }

    /// The store of a launcher's environment: [`Store::connect`] (rank 0
    /// serves), or [`Store::connect_client`] under torchrun's agent store;
    /// its keys under `attempt_N/` when torchrun says this is restart N.
    pub fn from_launch(env: &LaunchEnv, timeout: Duration) -> Result<Store> {
        let (host, port) = (&env.master_addr, env.master_port);
        let store = if env.agent_store {
            Store::connect_client(host, port, env.rank, env.world_size, timeout)?
        } else {
            Store::connect(host, port, env.rank, env.world_size, timeout)?
        };
        match env.restart_count {
            Some(n) => store.prefixed(&format!("attempt_{n}")),
            None => Ok(store),
        }
    }

    /// This process's rank, as given when connecting.
    pub fn rank(&self) -> usize {
        self.rank
    }

    fn store_error(&self, op: &'static str, key: &str, f: Failure) -> DistError {
        DistError::Store {
            rank: self.rank,
            op,
            key: key.to_string(),
            detail: f.message().to_string(),
        }
    }

    fn wait_error(&self, keys: &[&str], timeout: Duration, f: Failure) -> DistError {
        let timed_out = matches!(f, Failure::Timeout(_))
            || f.message().to_ascii_lowercase().contains("timeout")
            || f.message().to_ascii_lowercase().contains("timed out");
        if timed_out {
            DistError::StoreTimeout {
                rank: self.rank,
                keys: keys.iter().map(|k| k.to_string()).collect(),
                timeout,
            }
        } else {
            self.store_error("wait", &keys.join(", "), f)
        }
    }

    /// Sets `key` to `value` (overwriting).
    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.inner
            .set(key, value)
            .map_err(|f| self.store_error("set", key, f))
    }

    /// Waits up to `timeout` for `key` to exist, then returns its value.
    pub fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        self.inner
            .get(key, timeout)
            .map_err(|f| self.wait_error(&[key], timeout, f))
    }

    /// Adds `delta` to the integer at `key` (0 if absent) and returns the
    /// new value: a counter every rank can bump.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64> {
        self.inner
            .add(key, delta)
            .map_err(|f| self.store_error("add", key, f))
    }

    /// Waits up to `timeout` until all `keys` exist.
    pub fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()> {
        self.inner
            .wait(keys, timeout)
            .map_err(|f| self.wait_error(keys, timeout, f))
    }

    /// Whether all `keys` exist now, without waiting (e.g. to find which
    /// rank never checked in).
    pub fn check(&self, keys: &[&str]) -> Result<bool> {
        self.inner
            .check(keys)
            .map_err(|f| self.store_error("check", &keys.join(", "), f))
    }

    /// Deletes `key`; whether it existed.
    pub fn delete(&self, key: &str) -> Result<bool> {
        self.inner
            .delete(key)
            .map_err(|f| self.store_error("delete", key, f))
    }
}
