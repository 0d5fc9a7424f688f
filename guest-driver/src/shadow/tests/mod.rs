//! Tests of the shadow module, with a fake guest, a fake mapper and an
//! independent enumerator of shadow tables.

mod fakes;
mod ggtt_tests;
mod ppgtt_build_tests;
mod ppgtt_dup_tests;
mod ppgtt_extent_tests;
mod ppgtt_prop_tests;
mod ppgtt_revoke_tests;
mod ppgtt_sync_tests;
#[cfg(feature = "sim")]
mod session_tests;
