//! Reading tensors back to the host. On a GPU every read waits for the
//! device to finish what it was given (a synchronisation), so a training
//! step should read back as little as it can. Plugins and the core read
//! device data only through [`to_vec`], which counts the reads, so that
//! `vlmatch bench` can print them per step (`tests/tidy.rs` keeps other
//! ways out of plugin sources).

use crate::Result;
use std::sync::atomic::{AtomicU64, Ordering};
use tch::{Device, Tensor};

static COUNT: AtomicU64 = AtomicU64::new(0);

/// Read-backs so far in this process.
pub fn count() -> u64 {
    COUNT.load(Ordering::Relaxed)
}

/// `t`'s elements, flattened, on the host (one read-back).
pub fn to_vec<T: tch::kind::Element + Copy>(t: &Tensor) -> Result<Vec<T>> {
    COUNT.fetch_add(1, Ordering::Relaxed);
    Ok(Vec::<T>::try_from(t.to_device(Device::Cpu).reshape([-1]))?)
}
