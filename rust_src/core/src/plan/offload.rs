//! Which layers of a model ComfyUI keeps resident on the GPU for a byte budget, and which it streams.
//!
//! A port of the greedy walk in ComfyUI's legacy loader (`ModelPatcher.load`, used when Dynamic VRAM is
//! off): layers are visited from the most to the least expensive to stream; a layer stays resident while
//! `resident + layer + streaming buffer < budget`, where the streaming buffer is the room ComfyUI keeps for
//! weights cast on the fly. A layer that cannot be streamed (not a ComfyUI op) and does not fit is left
//! where it is ("unplaced"), as ComfyUI leaves it. As a pure function it lets a node say what a budget will
//! do before anything is loaded.
//!
//! Byte counts come from callers and saturate at `u64::MAX` instead of wrapping, so a sum too large to
//! represent never fits a budget (Python's ints do not wrap either, so ComfyUI's walk agrees).

use crate::error::CoreResult;
use crate::value_err;

/// How ComfyUI sizes the streaming buffer while it walks the layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufferRule {
    /// ComfyUI 0.29 and later: this layer's cast cost plus the sizes of the next `streams` layers in flight.
    NextLayers,
    /// ComfyUI 0.3.7x: this layer's cast cost times `streams + 1`.
    Multiply,
}

impl BufferRule {
    pub fn parse(name: &str) -> CoreResult<Self> {
        match name {
            "next_layers" => Ok(Self::NextLayers),
            "multiply" => Ok(Self::Multiply),
            other => Err(value_err!(
                "unknown buffer rule {other:?}; accepted: \"next_layers\", \"multiply\""
            )),
        }
    }
}

/// One layer as ComfyUI's loader sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layer {
    /// Bytes of its weights (what residency costs).
    pub bytes: u64,
    /// Bytes needed to run it streamed: the weights plus any dequantized or cast copy.
    pub cast_bytes: u64,
    /// Whether ComfyUI can stream it (a ComfyUI op with `comfy_cast_weights`).
    pub streamable: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResidentPlan {
    /// Per input layer: true if ComfyUI loads it completely (it stays on the GPU).
    pub resident: Vec<bool>,
    pub resident_bytes: u64,
    pub streamed_bytes: u64,
    pub streamed_layers: usize,
    /// Layers that can neither stream nor fit: ComfyUI leaves them on the offload device.
    pub unplaced_layers: usize,
    /// The streaming buffer ComfyUI reserves inside the budget (the largest it needed on the walk).
    pub buffer_bytes: u64,
    /// True when the budget covers the whole model and ComfyUI loads it completely.
    pub full_load: bool,
}

/// The plan for `layers` (given in ComfyUI's name order) under `budget` bytes.
///
/// `model_bytes` is the patcher's `model_size()`: a budget above it makes ComfyUI load everything. `streams`
/// is ComfyUI's `NUM_STREAMS` (async offload streams; 0 on a CPU).
pub fn plan_resident(
    layers: &[Layer],
    budget: u64,
    model_bytes: u64,
    streams: usize,
    rule: BufferRule,
) -> CoreResult<ResidentPlan> {
    if let Some(bad) = layers.iter().position(|l| l.cast_bytes < l.bytes) {
        return Err(value_err!(
            "layer {bad}: cast_bytes {} is smaller than its weights ({} bytes)",
            layers[bad].cast_bytes,
            layers[bad].bytes
        ));
    }
    let full_load = budget > model_bytes;
    // ComfyUI sorts (cast cost, bytes, name) tuples in reverse; the input is in name order, so a later
    // index wins a tie.
    let mut order: Vec<usize> = (0..layers.len()).collect();
    order.sort_by(|&a, &b| {
        let key = |i: usize| (layers[i].cast_bytes, layers[i].bytes, i);
        key(b).cmp(&key(a))
    });
    let mut resident = vec![false; layers.len()];
    let (mut used, mut buffer, mut largest_buffer) = (0u64, 0u64, 0u64);
    let (mut streamed_bytes, mut streamed_layers, mut unplaced_layers) = (0u64, 0usize, 0usize);
    for (pos, &i) in order.iter().enumerate() {
        let layer = layers[i];
        let potential = match rule {
            BufferRule::NextLayers => {
                let ahead = order[pos + 1..]
                    .iter()
                    .take(streams)
                    .fold(0u64, |sum, &j| sum.saturating_add(layers[j].bytes));
                buffer.max(layer.cast_bytes.saturating_add(ahead))
            }
            BufferRule::Multiply => buffer.max(
                layer
                    .cast_bytes
                    .saturating_mul((streams as u64).saturating_add(1)),
            ),
        };
        let fits = used.saturating_add(layer.bytes).saturating_add(potential) < budget;
        if !full_load && layer.streamable && !fits {
            buffer = potential;
            largest_buffer = largest_buffer.max(buffer);
            streamed_bytes = streamed_bytes.saturating_add(layer.bytes);
            streamed_layers += 1;
            continue;
        }
        if full_load || fits {
            resident[i] = true;
            used = used.saturating_add(layer.bytes);
        } else {
            buffer = potential;
            largest_buffer = largest_buffer.max(buffer);
            unplaced_layers += 1;
        }
    }
    Ok(ResidentPlan {
        resident,
        resident_bytes: used,
        streamed_bytes,
        streamed_layers,
        unplaced_layers,
        buffer_bytes: if streamed_layers > 0 {
            largest_buffer
        } else {
            0
        },
        full_load,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(bytes: u64) -> Layer {
        Layer {
            bytes,
            cast_bytes: bytes,
            streamable: true,
        }
    }

    #[test]
    fn everything_fits_above_the_model_size() {
        let layers = [layer(100), layer(50)];
        let plan = plan_resident(&layers, 151, 150, 2, BufferRule::NextLayers).unwrap();
        assert!(plan.full_load);
        assert_eq!(plan.resident, vec![true, true]);
        assert_eq!(
            (plan.resident_bytes, plan.streamed_bytes, plan.buffer_bytes),
            (150, 0, 0)
        );
    }

    #[test]
    fn biggest_layers_stay_while_room_is_left_for_the_buffer() {
        // Walk order: 400, 300, 200, 100. With no async streams the buffer is one layer's cast cost.
        let layers = [layer(100), layer(400), layer(200), layer(300)];
        let plan = plan_resident(&layers, 1000, 1000, 0, BufferRule::NextLayers).unwrap();
        // 400 + 400 < 1000 stays; 400 + 300 + 300 = 1000 is not < 1000 so it streams (buffer 300);
        // 400 + 200 + 300 < 1000 stays; 600 + 100 + 300 = 1000 streams.
        assert_eq!(plan.resident, vec![false, true, true, false]);
        assert_eq!(
            (
                plan.resident_bytes,
                plan.streamed_bytes,
                plan.streamed_layers
            ),
            (600, 400, 2)
        );
        assert_eq!(plan.buffer_bytes, 300);
    }

    #[test]
    fn streams_reserve_room_for_layers_in_flight() {
        let layers = [layer(100); 6];
        let next = plan_resident(&layers, 400, 600, 2, BufferRule::NextLayers).unwrap();
        let mult = plan_resident(&layers, 400, 600, 2, BufferRule::Multiply).unwrap();
        // Both rules reserve 300 here; 0 + 100 + 300 = 400 is not < 400, so nothing stays.
        assert_eq!(next.resident_bytes, 0);
        assert_eq!(mult.resident_bytes, 0);
        let roomier = plan_resident(&layers, 401, 600, 2, BufferRule::NextLayers).unwrap();
        assert_eq!(roomier.resident_bytes, 100);
        // Near the end of the walk fewer layers are in flight under the 0.29 rule, but the buffer never
        // shrinks once reserved.
        assert_eq!(roomier.buffer_bytes, 300);
    }

    #[test]
    fn ties_go_to_the_later_name_like_comfyui() {
        let layers = [layer(100), layer(100)];
        let plan = plan_resident(&layers, 201, 300, 0, BufferRule::NextLayers).unwrap();
        assert_eq!(plan.resident, vec![false, true]);
    }

    #[test]
    fn unstreamable_layers_never_stream() {
        let fixed = Layer {
            bytes: 500,
            cast_bytes: 500,
            streamable: false,
        };
        let plan = plan_resident(&[fixed, layer(10)], 0, 510, 0, BufferRule::NextLayers).unwrap();
        assert_eq!(plan.resident, vec![false, false]);
        assert_eq!(
            (
                plan.streamed_bytes,
                plan.streamed_layers,
                plan.unplaced_layers
            ),
            (10, 1, 1)
        );
        // The fixed layer needs room for itself and a buffer as large as its own cast cost.
        let roomy =
            plan_resident(&[fixed, layer(10)], 1001, 10_000, 0, BufferRule::NextLayers).unwrap();
        assert_eq!(roomy.resident, vec![true, true]);
        assert_eq!((roomy.resident_bytes, roomy.unplaced_layers), (510, 0));
    }

    #[test]
    fn sizes_that_would_wrap_saturate_and_never_fit() {
        // 2^63 + 2^63 (+ the buffer) wraps to a small number in wrapping arithmetic.
        let huge = [layer(1 << 63), layer(1 << 63)];
        for rule in [BufferRule::NextLayers, BufferRule::Multiply] {
            for streams in [0, 1, 2, usize::MAX] {
                let plan = plan_resident(&huge, 1_000_000, u64::MAX, streams, rule).unwrap();
                assert_eq!(plan.resident, vec![false, false], "{rule:?} {streams}");
                assert_eq!((plan.resident_bytes, plan.streamed_layers), (0, 2));
                assert_eq!(plan.streamed_bytes, u64::MAX);
            }
        }
        // A full load of layers larger than model_bytes claims (ComfyUI loads everything): totals saturate.
        let plan = plan_resident(&huge, 10, 1, 0, BufferRule::NextLayers).unwrap();
        assert!(plan.full_load);
        assert_eq!(plan.resident_bytes, u64::MAX);
    }

    #[test]
    fn cast_cost_below_the_weights_is_an_error() {
        let bad = Layer {
            bytes: 10,
            cast_bytes: 5,
            streamable: true,
        };
        let err = plan_resident(&[layer(1), bad], 100, 100, 0, BufferRule::Multiply).unwrap_err();
        assert!(err.to_string().contains("layer 1"));
        assert!(BufferRule::parse("fifo").is_err());
    }
}
