//! Placeholder, replaced below.
use crate::report::Report;
use crate::Ctx;
pub async fn run(_ctx: &Ctx, _report: &mut Report) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
