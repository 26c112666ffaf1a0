//! `vlmatch env`: what libtorch sees.

use vlmatch_core::Result;

/// Print CUDA availability, devices, cuDNN and intra-op threads.
pub fn env() -> Result<()> {
    println!("cuda available: {}", tch::Cuda::is_available());
    println!("cuda devices: {}", tch::Cuda::device_count());
    println!("cudnn available: {}", tch::Cuda::cudnn_is_available());
    println!("intra-op threads: {}", tch::get_num_threads());
    Ok(())
}
