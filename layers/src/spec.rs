//! Stack specs: `stripe=64k`, `fault,stripe=1m`, ... listed from the top of
//! the stack down. Layers above `stripe` see the pooled space once; layers
//! below it are made once per device.

use crate::device::Device;
use crate::fault::{Fault, FaultControl};
use crate::layer::{Counted, Layer};
use crate::stripe::Stripe;
use std::fmt;
use std::sync::Arc;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("unknown layer {0:?} (known: stripe, fault)")]
    UnknownLayer(String),
    #[error("layer {layer}: {why}")]
    BadParam { layer: String, why: String },
    #[error("layer {0} appears twice")]
    Duplicate(String),
    #[error("{0}")]
    Shape(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerSpec {
    Stripe { chunk: u64 },
    Fault,
}

impl LayerSpec {
    fn kind(&self) -> &'static str {
        match self {
            LayerSpec::Stripe { .. } => "stripe",
            LayerSpec::Fault => "fault",
        }
    }
}

impl fmt::Display for LayerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayerSpec::Stripe { chunk } => write!(f, "stripe={}", format_size(*chunk)),
            LayerSpec::Fault => write!(f, "fault"),
        }
    }
}

/// A parsed stack, top first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StackSpec {
    pub layers: Vec<LayerSpec>,
}

impl fmt::Display for StackSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.layers.iter().map(|l| l.to_string()).collect();
        write!(f, "{}", parts.join(","))
    }
}

/// `4096`, `64k`, `1m`, `2g` (binary units).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim().to_ascii_lowercase();
    let s = s
        .strip_suffix("ib")
        .or_else(|| s.strip_suffix('b'))
        .unwrap_or(&s);
    let (num, mult) = match s.chars().last()? {
        'k' => (&s[..s.len() - 1], 1u64 << 10),
        'm' => (&s[..s.len() - 1], 1 << 20),
        'g' => (&s[..s.len() - 1], 1 << 30),
        't' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

pub fn format_size(n: u64) -> String {
    for (unit, shift) in [("g", 30), ("m", 20), ("k", 10)] {
        if n >= 1 << shift && n % (1 << shift) == 0 {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

impl StackSpec {
    pub fn parse(s: &str) -> Result<StackSpec, SpecError> {
        let mut layers = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, param) = match part.split_once('=') {
                Some((n, p)) => (n.trim(), Some(p.trim())),
                None => (part, None),
            };
            let layer = match name {
                "stripe" => {
                    let p = param
                        .ok_or_else(|| bad("stripe", "needs a chunk size, e.g. stripe=64k"))?;
                    let chunk = parse_size(p)
                        .ok_or_else(|| bad("stripe", format!("chunk size {p:?} is not a size")))?;
                    if chunk == 0 || chunk % 4096 != 0 {
                        return Err(bad(
                            "stripe",
                            format!("chunk size {p} is not a multiple of 4 KiB"),
                        ));
                    }
                    LayerSpec::Stripe { chunk }
                }
                "fault" => {
                    if let Some(p) = param {
                        return Err(bad(
                            "fault",
                            format!("takes no parameter (got {p:?}); steer it at run time"),
                        ));
                    }
                    LayerSpec::Fault
                }
                other => return Err(SpecError::UnknownLayer(other.to_string())),
            };
            if layers
                .iter()
                .any(|l: &LayerSpec| l.kind() == layer.kind() && l.kind() != "fault")
            {
                return Err(SpecError::Duplicate(layer.kind().into()));
            }
            layers.push(layer);
        }
        Ok(StackSpec { layers })
    }

    pub fn chunk(&self) -> Option<u64> {
        self.layers.iter().find_map(|l| match l {
            LayerSpec::Stripe { chunk } => Some(*chunk),
            _ => None,
        })
    }

    /// Build the stack over opened devices (in pool order). Every layer is
    /// wrapped in the framework's counters.
    pub fn build(&self, devices: Vec<Arc<Device>>) -> Result<Stack, SpecError> {
        if devices.is_empty() {
            return Err(SpecError::Shape("no devices".into()));
        }
        let stripe_at = self
            .layers
            .iter()
            .position(|l| matches!(l, LayerSpec::Stripe { .. }));
        if stripe_at.is_none() && devices.len() > 1 {
            return Err(SpecError::Shape(format!(
                "{} devices but no stripe layer to pool them (add e.g. stripe=64k)",
                devices.len()
            )));
        }
        let split = stripe_at.unwrap_or(self.layers.len());
        let mut faults = Vec::new();
        let mut lowers: Vec<Arc<dyn Layer>> = Vec::new();
        for dev in devices {
            let mut l: Arc<dyn Layer> = Counted::wrap(dev);
            for spec in self.layers[split..].iter().rev() {
                l = self.make_filter(spec, l, &mut faults);
            }
            lowers.push(l);
        }
        let mut top = match stripe_at.map(|i| &self.layers[i]) {
            Some(LayerSpec::Stripe { chunk }) => {
                Counted::wrap(Arc::new(Stripe::new(*chunk, lowers)?))
            }
            _ => lowers.pop().expect("one device"),
        };
        for spec in self.layers[..split].iter().rev() {
            top = self.make_filter(spec, top, &mut faults);
        }
        Ok(Stack { top, faults })
    }

    fn make_filter(
        &self,
        spec: &LayerSpec,
        lower: Arc<dyn Layer>,
        faults: &mut Vec<Arc<FaultControl>>,
    ) -> Arc<dyn Layer> {
        match spec {
            LayerSpec::Fault => {
                let ctl = FaultControl::new();
                faults.push(ctl.clone());
                Counted::wrap(Fault::new(lower, ctl))
            }
            // Only filters are instantiated per device; stripe is placed by `build`.
            LayerSpec::Stripe { .. } => lower,
        }
    }
}

fn bad(layer: &str, why: impl Into<String>) -> SpecError {
    SpecError::BadParam {
        layer: layer.into(),
        why: why.into(),
    }
}

/// A built stack: its top layer, and the switches of its fault layers.
pub struct Stack {
    pub top: Arc<dyn Layer>,
    pub faults: Vec<Arc<FaultControl>>,
}

/// Every node of the stack, top first, with its depth.
pub fn walk(top: &Arc<dyn Layer>) -> Vec<(usize, Arc<dyn Layer>)> {
    let mut out = Vec::new();
    let mut todo = vec![(0usize, top.clone())];
    while let Some((d, l)) = todo.pop() {
        for lower in l.lowers().into_iter().rev() {
            todo.push((d + 1, lower));
        }
        out.push((d, l));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let s = StackSpec::parse("fault, stripe=64k").unwrap();
        assert_eq!(
            s.layers,
            vec![LayerSpec::Fault, LayerSpec::Stripe { chunk: 65536 }]
        );
        assert_eq!(s.to_string(), "fault,stripe=64k");
        assert_eq!(StackSpec::parse("").unwrap().layers, vec![]);
    }

    #[test]
    fn rejects_bad_specs() {
        assert!(matches!(
            StackSpec::parse("stripe=3k"),
            Err(SpecError::BadParam { .. })
        ));
        assert!(matches!(
            StackSpec::parse("stripe=abc"),
            Err(SpecError::BadParam { .. })
        ));
        assert!(matches!(
            StackSpec::parse("stripe"),
            Err(SpecError::BadParam { .. })
        ));
        assert!(matches!(
            StackSpec::parse("stripe=0"),
            Err(SpecError::BadParam { .. })
        ));
        assert!(matches!(
            StackSpec::parse("raid5=64k"),
            Err(SpecError::UnknownLayer(_))
        ));
        assert!(matches!(
            StackSpec::parse("stripe=64k,stripe=1m"),
            Err(SpecError::Duplicate(_))
        ));
        assert!(matches!(
            StackSpec::parse("fault=1"),
            Err(SpecError::BadParam { .. })
        ));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("12x"), None);
        assert_eq!(parse_size("1M"), Some(1 << 20));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("99999999999999999999t"), None);
        assert_eq!(format_size(65536), "64k");
    }
}
