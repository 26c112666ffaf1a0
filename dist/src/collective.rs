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

    /// This rank's part of the element-wise sum of every rank's `t`, without
    /// gradient: `t` is `world_size` equal parts along dim 0, part `r` for
    /// rank `r` (see [`ProcessGroup::reduce_scatter_sum`]: a true
    /// reduce-scatter on NCCL, an all-reduce of `t` on Gloo). Waits for it.
    /// Not in the core's [`Collective`]: objectives never need it; ZeRO
    /// stage 1's gradient reduction does.
    pub fn reduce_scatter_sum(&self, t: &Tensor) -> vlmatch_core::Result<Tensor> {
        let input = t.detach().contiguous();
        let mut shape = input.size();
        let n = self.group.size() as i64;
        if shape.first().is_none_or(|rows| rows % n != 0) {
            return Err(vlmatch_core::Error::plugin(
                "distributed",
                format!(
                    "reduce_scatter: {shape:?} does not split into {n} equal parts along dim 0"
                ),
            ));
        }
        shape[0] /= n;
        let mut out = Tensor::empty(shape.as_slice(), (input.kind(), input.device()));
        self.group
            .reduce_scatter_sum(&mut out, &input)
            .and_then(|w| w.wait())
            .map_err(to_core_error)?;
        Ok(out)
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
