//! `mesh-agent ca`: the cluster certificate authority.

use crate::config::CaArgs;

pub async fn run(args: CaArgs) -> anyhow::Result<()> {
    anyhow::bail!("mesh-agent ca is not written yet ({args:?})")
}
