//! Shared by the property tests.

use proptest::test_runner::Config as ProptestConfig;

/// `cases` cases; a failure is reported (with its shrunk input), not saved
/// to a regressions file in the source tree.
pub fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}
