//! Planners: pure functions from sizes and budgets to decisions (chunk sizes, what stays on the GPU),
//! each with the numbers behind it so that the Python side can explain the choice.

pub mod attention;
pub mod offload;
