//! Points the test binaries at the libpython they link (the panic guard's tests embed an interpreter), so
//! `cargo test` runs without LD_LIBRARY_PATH. A no-op for the extension module maturin builds, which does
//! not link libpython.
fn main() {
    pyo3_build_config::add_libpython_rpath_link_args();
}
