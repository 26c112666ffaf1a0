//! [`vlmatch_core::Collective`] over a c10d process group: what objectives
//! and samplers call to see the global batch.

use tch::Tensor;
use vlmatch_core::Collective;

use crate::{DistError, ProcessGroup};

/// A [`ProcessGroup`] seen through the core's [`Collective`] trait. The
/// trainer keeps using [`DistCollective::group`] for the gradient reducer,
/// parameter broadcast and agreements.
#[derive(Debug)]
pub struct DistCollective {
    group: ProcessGroup,
}

impl DistCollective {
    pub fn new(group: ProcessGroup) -> DistCollective {
        DistCollective { group }
    }

    pub fn group(&self) -> &ProcessGroup {
        &self.group
    }

    pub fn group_mut(&mut self) -> &mut ProcessGroup {
        &mut self.group
    }

    pub fn into_inner(self) -> ProcessGroup {
        self.group
    }
}

/// The core has no distributed error variant; a failed collective is
/// reported as an error of the `distributed` component, with the full
/// message (rank, operation, timeout, what to check).
pub fn to_core_error(e: DistError) -> vlmatch_core::Error {
    vlmatch_core::Error::plugin("distributed", e.to_string())
}

impl Collective for DistCollective {
    fn rank(&self) -> usize {
        self.group.rank()
    }

    fn world_size(&self) -> usize {
        self.group.size()
    }

    fn all_gather_with_grad(&self, t: &Tensor) -> vlmatch_core::Result<Tensor> {
        self.group.all_gather_with_grad(t).map_err(to_core_error)
    }

    fn all_gather(&self, t: &Tensor) -> vlmatch_core::Result<Tensor> {
        self.group.all_gather(&t.detach()).map_err(to_core_error)
    }

    fn all_reduce_sum(&self, t: &Tensor) -> vlmatch_core::Result<Tensor> {
        // A private contiguous copy: the all-reduce works in place.
        let mut out = [t.detach().contiguous().copy()];
        self.group
            .all_reduce_sum(&mut out)
            .and_then(|w| w.wait())
            .map_err(to_core_error)?;
        let [out] = out;
        Ok(out)
    }
}
