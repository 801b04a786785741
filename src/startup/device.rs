//! The devices engines run on (`--devices cpu`, `--devices cuda:0,cuda:1`): parsing their names,
//! opening them, the compute dtype each gets by default, and how much of a GPU's free memory its
//! KV cache may take.

#[cfg(feature = "cuda")]
use anyhow::Context;
use anyhow::{bail, Result};
use candle_core::{DType, Device};

use crate::config::{Dtype, EngineConfig};

/// An opened device and the name it was configured by.
pub struct OpenDevice {
    pub name: String,
    pub device: Device,
}

/// Opens each configured device. A name may repeat (several engines on one device, e.g. to
/// test the pool on a CPU): its repeats are named `cpu#1`, `cpu#2`, ... in logs and metrics.
pub fn open_all(names: &[String]) -> Result<Vec<OpenDevice>> {
    if names.is_empty() {
        bail!("no device configured: give --devices cpu, or cuda:0,cuda:1, ...");
    }
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let name = name.trim();
            let before = names[..i].iter().filter(|n| n.trim() == name).count();
            Ok(OpenDevice {
                name: match before {
                    0 => name.to_string(),
                    n => format!("{name}#{n}"),
                },
                device: open(name)?,
            })
        })
        .collect()
}

/// `cpu` or `cuda:N` (`cuda` alone is `cuda:0`).
fn open(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => open_cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => open_cuda(ordinal),
            _ => bail!("unknown device `{other}`: expected `cpu` or `cuda:N`"),
        },
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).with_context(|| format!("cannot open GPU cuda:{ordinal}"))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device> {
    bail!(
        "cuda:{ordinal} asked for, but this mmserve was built without CUDA \
         (build it with scripts/build-cuda.sh)"
    )
}

/// The compute dtype on `device`: the configured one, or by default f32 on the CPU (it has no
/// fast bf16 matmul) and bf16 on a GPU.
pub fn compute_dtype(dtype: Dtype, device: &Device) -> DType {
    match (dtype, device) {
        (Dtype::Auto, Device::Cpu) => DType::F32,
        (Dtype::Auto, _) => DType::BF16,
        (d, _) => d.candle(),
    }
}

/// Image tokens one engine encodes per step (`engine.max_encoder_tokens`; 0: automatic).
/// Automatic is 1 on the CPU, one request's images a step: the encoder's matmuls already use
/// every core, so batching images there saves nothing and makes the first wait for the last.
/// On a GPU, batching pays: as many as a step's tokens.
pub fn encoder_tokens(engine: &EngineConfig, device: &Device) -> usize {
    match (engine.max_encoder_tokens, device) {
        (0, Device::Cpu) => 1,
        (0, _) => engine.max_batched_tokens,
        (n, _) => n,
    }
}

/// Bytes the KV cache of one engine may take: `kv_cache_bytes` on the CPU; on a GPU,
/// `gpu_memory_utilization` of the memory still free once the engine's weights are loaded.
pub fn kv_cache_bytes(engine: &EngineConfig, device: &Device) -> Result<usize> {
    match device {
        Device::Cpu => Ok(engine.kv_cache_bytes),
        _ => {
            let free = free_memory(device)?;
            Ok((free as f64 * engine.gpu_memory_utilization) as usize)
        }
    }
}

#[cfg(feature = "cuda")]
fn free_memory(device: &Device) -> Result<usize> {
    let cuda = device.as_cuda_device().context("not a CUDA device")?;
    let (free, _total) = cuda
        .cuda_stream()
        .context()
        .mem_get_info()
        .context("cannot read the GPU's free memory")?;
    Ok(free)
}

#[cfg(not(feature = "cuda"))]
fn free_memory(_device: &Device) -> Result<usize> {
    bail!("this mmserve was built without GPU support")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_or_say_what_was_expected() {
        let cpu = open_all(&["cpu".into(), "cpu".into()]).unwrap();
        let names: Vec<&str> = cpu.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["cpu", "cpu#1"]);
        assert!(cpu.iter().all(|d| d.device.is_cpu()));
        let err = open_all(&["tpu".into()]).err().unwrap().to_string();
        assert!(err.contains("`tpu`") && err.contains("cuda:N"), "{err}");
        assert!(open_all(&[]).is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_cpu_build_refuses_gpus_clearly() {
        let err = open_all(&["cuda:1".into()]).err().unwrap().to_string();
        assert!(
            err.contains("without CUDA") && err.contains("build-cuda.sh"),
            "{err}"
        );
    }

    #[test]
    fn auto_is_f32_on_the_cpu() {
        assert_eq!(compute_dtype(Dtype::Auto, &Device::Cpu), DType::F32);
        assert_eq!(compute_dtype(Dtype::F16, &Device::Cpu), DType::F16);
    }
}
