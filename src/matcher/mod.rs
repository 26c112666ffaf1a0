//! Using a trained matcher (`vlmatch embed`, `search`, `score`, `filter`):
//! an index of ITC embeddings with the model's fingerprint
//! ([`index`]), filled resumably ([`embed`]); exact top-k search over it,
//! optionally re-ranked by ITM ([`search`]); per-pair ITC, ITM and
//! per-word mismatch scores of a dataset, streamed and resumable, and the
//! filter that keeps the pairs at or above a threshold ([`score`],
//! [`filter`], writing a tar shard through [`shards_out`] when the pairs
//! came from shards).
//!
//! Nothing here reads command-line arguments; `crate::commands::matcher`
//! does, and calls these.

pub mod embed;
pub mod filter;
pub mod index;
pub mod score;
pub mod search;
pub mod shards_out;
