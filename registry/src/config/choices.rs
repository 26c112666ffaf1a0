//! The typed sections' keys whose values are a closed set, as enums: a
//! value outside the set is an error naming the key, the layer that set it
//! and the values allowed.

use serde::{Deserialize, Serialize};
use std::fmt;

/// `train.device`: `auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum TrainDevice {
    #[default]
    Auto,
    Cpu,
    /// `cuda`: the first GPU (each rank's own in a data-parallel run).
    Cuda,
    /// `cuda:N`: that GPU.
    CudaIndex(usize),
}

impl TryFrom<String> for TrainDevice {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "auto" => Ok(TrainDevice::Auto),
            "cpu" => Ok(TrainDevice::Cpu),
            "cuda" => Ok(TrainDevice::Cuda),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(TrainDevice::CudaIndex)
                .ok_or_else(|| format!("expected auto, cpu, cuda or cuda:N, got `{other}`")),
        }
    }
}

impl fmt::Display for TrainDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrainDevice::Auto => f.write_str("auto"),
            TrainDevice::Cpu => f.write_str("cpu"),
            TrainDevice::Cuda => f.write_str("cuda"),
            TrainDevice::CudaIndex(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl From<TrainDevice> for String {
    fn from(d: TrainDevice) -> String {
        d.to_string()
    }
}

/// `train.precision`: `auto` (bf16 on CUDA, fp32 on CPU), `fp32` or `bf16`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Auto,
    Fp32,
    Bf16,
}

/// `data.source`: `synthetic` (built in, no download), `annotations`
/// (ALBEF/BLIP JSON) or `webdataset` (tar shards, streamed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataSource {
    Synthetic,
    Annotations,
    Webdataset,
}

/// `eval.rerank`: `itm` (the ITM match probability, as ALBEF) or `itm+itc`
/// (that plus the ITC similarity).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rerank {
    #[default]
    #[serde(rename = "itm")]
    Itm,
    #[serde(rename = "itm+itc")]
    ItmItc,
}

impl Rerank {
    pub fn as_str(self) -> &'static str {
        match self {
            Rerank::Itm => "itm",
            Rerank::ItmItc => "itm+itc",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_round_trip_through_their_text() {
        for text in ["auto", "cpu", "cuda", "cuda:0", "cuda:7"] {
            let d = TrainDevice::try_from(text.to_string()).unwrap();
            assert_eq!(String::from(d), text);
        }
        assert_eq!(
            TrainDevice::try_from("cuda:1".to_string()),
            Ok(TrainDevice::CudaIndex(1))
        );
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", ""] {
            let e = TrainDevice::try_from(bad.to_string()).unwrap_err();
            assert!(
                e.contains("auto, cpu, cuda or cuda:N") && e.contains(bad),
                "{e}"
            );
        }
    }
}
