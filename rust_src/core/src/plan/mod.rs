//! Planners: pure functions from sizes and budgets to decisions (chunk sizes, what stays on the GPU, the
//! cheapest rungs of the VRAM ladder that fit), each with the numbers behind it so that the Python side can
//! explain the choice.
//!
//! The fit planner is `ladder::plan_fit`: it takes a `profile::ModelProfile` (built in: `builtin`), a
//! `profile::DeviceProfile` and a `profile::Job`, and predicts with `cost::evaluate`.

pub mod attention;
pub mod builtin;
pub mod cost;
pub mod ladder;
pub mod offload;
pub mod profile;

#[cfg(test)]
mod tests;
