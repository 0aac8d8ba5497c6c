//! Safe upgrades (docs/OPERATIONS.md, "Upgrading"): `orderflow check` and
//! `orderflow replay --verify [--swap]`. The work is in `projector::check` and
//! `projector::verify`; this prints their reports and turns them into exit codes.
use std::process::ExitCode;

use anyhow::Context;
use eventstore::EventStore;

/// Decodes and folds every stored event; exit 1 when any fails.
pub async fn check(store: &EventStore) -> anyhow::Result<ExitCode> {
    let report = projector::check::check(store)
        .await
        .context("check could not read the log")?;
    print!("{report}");
    Ok(exit_code(report.is_clean()))
}

/// Rebuilds into shadow tables and prints the differences; with `swap`, replaces the
/// live rows. Exit 1 when rows differ and were left as they were.
pub async fn verify(
    store: &EventStore,
    projection: Option<&str>,
    swap: bool,
) -> anyhow::Result<ExitCode> {
    let projections = match projection {
        Some(name) => vec![projector::by_name(name)?],
        None => projector::all_projections(),
    };
    let refs: Vec<&dyn projector::Projection> = projections.iter().map(|p| p.as_ref()).collect();
    let report = projector::verify::verify(store, &refs, swap)
        .await
        .context("replay --verify failed; the live rows are untouched")?;
    print!("{report}");
    Ok(exit_code(report.differences() == 0 || report.swapped))
}

fn exit_code(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
