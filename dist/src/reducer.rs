//! Data-parallel gradient averaging in buckets, as PyTorch's DDP does it.
//!
//! A [`GradReducer`] is built once from the trainable parameters. Buckets
//! are filled in *reverse* parameter order (backward produces the last
//! layers' gradients first) up to `bucket_mb` MiB of fp32 each, and a new
//! bucket starts wherever the device or the gradient's reduction type
//! changes. Each step, after `backward`:
//!
//! ```text
//! reducer.reduce(&group)?;   // every .grad is now the mean over ranks
//! ```
//!
//! flattens each bucket's gradients into one contiguous fp32 buffer
//! (bf16/fp16 gradients are reduced in fp32; fp64 stays fp64), starts its
//! SUM all-reduce as soon as it is flattened, waits for all, divides by the
//! world size and copies the averages back.
//!
//! Unused parameters are treated as DDP treats them: each bucket's buffer
//! ends with one flag per parameter, 1 where this rank has a gradient and 0
//! where its `.grad` is undefined (no objective used the parameter), summed
//! with the gradients. Where no rank had a gradient the `.grad` stays
//! undefined on every rank, so the optimizer leaves the parameter alone (no
//! weight decay, no moment update), exactly as one process would. Where
//! some ranks had one, the others count as zeros: the average is defined
//! everywhere.
//!
//! [`GradReducer::overlap_with_backward`] instead registers a C++
//! post-accumulate-grad hook on every parameter
//! (`torch::autograd::impl::set_post_acc_grad_hooks`, the mechanism behind
//! Python's `Tensor.register_post_accumulate_grad_hook`): during backward
//! each gradient is copied into its bucket the moment autograd has
//! accumulated it, and a complete bucket's all-reduce starts while backward
//! still computes the earlier layers. Buckets start strictly in order, so
//! every rank launches the same collectives in the same order whatever its
//! timing. [`GradReducer::reduce`] then only launches the buckets holding a
//! parameter that received no gradient (its hook never fires), and waits.

use std::collections::HashSet;

use tch::{Device, Kind, Tensor};

use crate::ffi::{self, ReducerHandle};
use crate::{DistError, Op, ProcessGroup, Result};

/// DDP's default bucket size, in MiB of fp32 gradients.
pub const DEFAULT_BUCKET_MB: f64 = 25.0;

/// The type a parameter's gradient is reduced in: fp32 for floating types
/// of up to 32 bits, the parameter's own type otherwise.
fn reduce_kind(kind: Kind) -> Kind {
    match kind {
        Kind::Half | Kind::BFloat16 | Kind::Float => Kind::Float,
        other => other,
    }
}

/// The bucket of each parameter, for parameters described by their
/// (device, reduction kind, byte size): reverse order, a new bucket when the
/// device or kind changes or the current one has reached `cap` bytes.
/// Returns each bucket's parameter indices in fill order.
pub(crate) fn assign_buckets(params: &[(Device, Kind, usize)], cap: usize) -> Vec<Vec<usize>> {
    let mut buckets: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut bytes = 0usize;
    let mut key: Option<(Device, Kind)> = None;
    for i in (0..params.len()).rev() {
        let (device, kind, size) = params[i];
        let k = (device, kind);
        if !current.is_empty() && (key != Some(k) || bytes >= cap) {
            buckets.push(std::mem::take(&mut current));
            bytes = 0;
        }
        key = Some(k);
        current.push(i);
        bytes += size;
    }
    if !current.is_empty() {
        buckets.push(current);
    }
    buckets
}

/// Averages gradients over the ranks of a process group, in buckets; see
/// the module documentation.
pub struct GradReducer {
    raw: ReducerHandle,
    buckets: Vec<Vec<usize>>,
    bucket_bytes: Vec<usize>,
    /// Whether the gradient hooks are attached.
    overlapping: bool,
}

impl std::fmt::Debug for GradReducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GradReducer")
            .field("buckets", &self.buckets.len())
            .field("bucket_bytes", &self.bucket_bytes)
            .field("overlapping", &self.overlapping)
            .finish()
    }
}

impl GradReducer {
    /// A reducer for `params` (e.g. `vs.trainable_variables()`: leaf tensors
    /// that require grad; each at most once), with buckets of up to
    /// `bucket_mb` MiB ([`DEFAULT_BUCKET_MB`] is DDP's 25). Every rank must
    /// build it from the same parameter list (same shapes, same order).
    pub fn new(params: &[Tensor], bucket_mb: f64) -> Result<GradReducer> {
        let invalid = |detail: String| DistError::InvalidParameters { detail };
        if params.is_empty() {
            return Err(invalid("no parameters given".into()));
        }
        if !(bucket_mb > 0.0 && bucket_mb.is_finite()) {
            return Err(invalid(format!(
                "bucket size {bucket_mb} MiB is not a positive number"
            )));
        }
        let cap = (bucket_mb * 1024.0 * 1024.0) as usize;
        let described: Vec<(Device, Kind, usize)> = params
            .iter()
            .map(|p| {
                let kind = reduce_kind(p.kind());
                let numel = p.numel();
                (p.device(), kind, numel * kind.elt_size_in_bytes())
            })
            .collect();
        let buckets = assign_buckets(&described, cap.max(1));
        let mut ordered = Vec::with_capacity(params.len());
        let mut order_of_bucket = Vec::with_capacity(params.len());
        let mut bucket_bytes = Vec::with_capacity(buckets.len());
        for (b, members) in buckets.iter().enumerate() {
            // The gradients, then one "has a gradient" flag per parameter
            // in the bucket's type.
            let flags = members.len() * described[members[0]].1.elt_size_in_bytes();
            bucket_bytes.push(members.iter().map(|&i| described[i].2).sum::<usize>() + flags);
            for &i in members {
                ordered.push(params[i].shallow_clone());
                order_of_bucket.push(b);
            }
        }
        let raw = ReducerHandle::new(&ordered, &order_of_bucket)
            .map_err(|f| invalid(f.message().to_string()))?;
        Ok(GradReducer {
            raw,
            buckets,
            bucket_bytes,
            overlapping: false,
        })
    }

    /// Each bucket's parameter indices (into the list given to
    /// [`GradReducer::new`]), in the order the buckets are reduced.
    pub fn buckets(&self) -> &[Vec<usize>] {
        &self.buckets
    }

    /// Each bucket's size in bytes of its reduction buffer: its gradients
    /// plus one flag element per parameter.
    pub fn bucket_bytes(&self) -> &[usize] {
        &self.bucket_bytes
    }

    /// Total bytes all-reduced per step (every parameter once).
    pub fn total_bytes(&self) -> usize {
        self.bucket_bytes.iter().sum()
    }

    /// After backward: averages every parameter's gradient over the ranks
    /// of `group` in place, leaving undefined the gradients no rank has
    /// (see the module documentation). Waits up to the
    /// group's timeout. On every rank, once per step, with the same
    /// parameters. With hooks attached ([`GradReducer::overlap_with_backward`])
    /// `group` must be the group given there.
    pub fn reduce(&self, group: &ProcessGroup) -> Result<()> {
        let op = Op::AllReduce;
        let raw = group.handle(op)?;
        self.raw
            .finish(raw, group.timeout())
            .map_err(|f| group.start_error(op, f))
    }

    /// Registers the gradient hooks: from the next backward on, each bucket
    /// starts its all-reduce on `group` as soon as all its gradients exist,
    /// while backward goes on. [`GradReducer::reduce`] must still follow
    /// every backward. Fails if a parameter is not a leaf that requires
    /// grad, or already has a post-accumulate-grad hook.
    pub fn overlap_with_backward(&mut self, group: &ProcessGroup) -> Result<()> {
        let raw = group.handle(Op::AllReduce)?;
        self.raw
            .attach(raw)
            .map_err(|f| DistError::InvalidParameters {
                detail: f.message().to_string(),
            })?;
        self.overlapping = true;
        Ok(())
    }

    /// Removes the hooks (also done on drop); later steps reduce after
    /// backward.
    pub fn stop_overlap(&mut self) {
        self.raw.detach();
        self.overlapping = false;
    }

    /// How many buckets the hooks had started during the last backward
    /// when the last [`GradReducer::reduce`] began (0 without hooks): the
    /// part of the communication that overlapped with backward.
    pub fn last_overlapped_buckets(&self) -> usize {
        self.raw.last_overlapped()
    }

    /// Whether the hooks are attached.
    pub fn is_overlapping(&self) -> bool {
        self.overlapping
    }

    /// With hooks attached, `false` makes them leave gradients alone (the
    /// micro-steps of gradient accumulation, DDP's `no_sync`); set it back
    /// to `true` before the last micro-step's backward, whose hooks then
    /// reduce the accumulated sums. No effect without hooks.
    pub fn set_sync(&self, sync: bool) {
        self.raw.set_sync(sync);
    }
}

/// Broadcasts every tensor in `tensors` from rank 0 in place, without
/// recording anything for autograd (parameters stay leaves): the start of a
/// data-parallel run, so every rank begins from rank 0's weights. Tensors
/// are packed by dtype and device into flat buffers of up to 64 MiB, one
/// broadcast each, all in flight at once. Waits up to the group's timeout.
pub fn broadcast_parameters(group: &ProcessGroup, tensors: &[Tensor]) -> Result<()> {
    const CHUNK: usize = 64 << 20;
    let _guard = tch::no_grad_guard();
    let mut seen = HashSet::new();
    // Chunks of consecutive tensors with one dtype and device.
    let mut chunks: Vec<Vec<&Tensor>> = Vec::new();
    let mut bytes = 0usize;
    for t in tensors {
        if !seen.insert(t.data_ptr() as usize) && t.numel() > 0 {
            // The same storage twice (tied weights): broadcast once.
            continue;
        }
        let size = t.numel() * t.kind().elt_size_in_bytes();
        let fits = chunks.last().is_some_and(|c| {
            let first = c[0];
            first.kind() == t.kind() && first.device() == t.device() && bytes + size <= CHUNK
        });
        if fits {
            chunks.last_mut().expect("a chunk").push(t);
            bytes += size;
        } else {
            chunks.push(vec![t]);
            bytes = size;
        }
    }
    let mut pending = Vec::with_capacity(chunks.len());
    for chunk in &chunks {
        let flat: Vec<Tensor> = chunk.iter().map(|t| t.detach().reshape([-1])).collect();
        let mut buffer = Tensor::cat(&flat, 0);
        let work = group.broadcast(&mut buffer, 0)?;
        pending.push((work, buffer));
    }
    for ((work, buffer), chunk) in pending.into_iter().zip(&chunks) {
        work.wait()?;
        let mut offset = 0i64;
        for t in chunk {
            let n = t.numel() as i64;
            let mut target = t.detach();
            target.copy_(&buffer.narrow(0, offset, n).view(t.size().as_slice()));
            offset += n;
        }
    }
    Ok(())
}

/// Whether `flag` is true on *any* rank, agreed by all: a SUM all-reduce of
/// a 0/1 flag, so a stop decision one rank takes (a non-finite loss, a
/// signal) is taken by every rank at the same step. Waits up to the group's
/// timeout.
pub fn agree_any(group: &ProcessGroup, flag: bool) -> Result<bool> {
    let mut t = [Tensor::from_slice(&[i64::from(flag)]).to_device(group.device())];
    group.all_reduce_sum(&mut t)?.wait()?;
    Ok(t[0].to_device(Device::Cpu).int64_value(&[0]) > 0)
}

/// Sets `param`'s gradient to `grad`, defining it where it was undefined
/// (tch has no setter). The gradient shares `grad`'s storage.
pub fn set_grad(param: &Tensor, grad: &Tensor) -> Result<()> {
    ffi::set_grad(param, grad).map_err(|f| DistError::InvalidParameters {
        detail: f.message().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(kind: Kind, bytes: usize) -> (Device, Kind, usize) {
        (Device::Cpu, kind, bytes)
    }

    #[test]
    fn buckets_fill_in_reverse_up_to_the_cap() {
        let params = [
            cpu(Kind::Float, 40),
            cpu(Kind::Float, 40),
            cpu(Kind::Float, 40),
            cpu(Kind::Float, 100),
            cpu(Kind::Float, 10),
        ];
        // Last parameter first; a bucket closes once it holds >= 50 bytes.
        assert_eq!(
            assign_buckets(&params, 50),
            vec![vec![4, 3], vec![2, 1], vec![0]]
        );
        assert_eq!(assign_buckets(&params, 1 << 20), vec![vec![4, 3, 2, 1, 0]]);
        assert_eq!(
            assign_buckets(&params, 1),
            vec![vec![4], vec![3], vec![2], vec![1], vec![0]]
        );
    }

    #[test]
    fn buckets_split_where_device_or_kind_changes() {
        let params = [
            cpu(Kind::Float, 4),
            cpu(Kind::Double, 8),
            cpu(Kind::Double, 8),
            (Device::Cuda(0), Kind::Float, 4),
            cpu(Kind::Float, 4),
        ];
        assert_eq!(
            assign_buckets(&params, 1 << 20),
            vec![vec![4], vec![3], vec![2, 1], vec![0]]
        );
    }

    #[test]
    fn half_precision_gradients_reduce_in_fp32() {
        assert_eq!(reduce_kind(Kind::BFloat16), Kind::Float);
        assert_eq!(reduce_kind(Kind::Half), Kind::Float);
        assert_eq!(reduce_kind(Kind::Double), Kind::Double);
    }

    #[test]
    fn reducer_rejects_bad_input() {
        let p = Tensor::zeros([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        assert!(GradReducer::new(&[], 25.0).is_err());
        assert!(GradReducer::new(&[p.shallow_clone()], 0.0).is_err());
        let e = GradReducer::new(&[p.shallow_clone(), p.shallow_clone()], 25.0).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let r = GradReducer::new(&[p.shallow_clone()], 25.0).unwrap();
        assert_eq!(r.buckets(), &[vec![0]]);
        // 3 fp32 gradients and the parameter's flag.
        assert_eq!(r.total_bytes(), 16);
    }

    #[test]
    fn set_grad_defines_a_missing_gradient() {
        let p = Tensor::zeros([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        assert!(!p.grad().defined());
        set_grad(&p, &Tensor::from_slice(&[1f32, 2.0])).unwrap();
        assert_eq!(Vec::<f32>::try_from(&p.grad()).unwrap(), vec![1.0, 2.0]);
    }
}
