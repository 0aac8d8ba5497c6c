use bus::topology::{all_queues, declare_topology};
use bus::COMMANDS_EXCHANGE;
use lapin::options::ExchangeDeclareOptions;
use lapin::types::{FieldTable, ShortString};
use lapin::ExchangeKind;

use crate::support::connected;

#[tokio::test]
async fn declaring_the_topology_twice_is_fine_and_a_plain_client_declare_of_commands_agrees(
) -> anyhow::Result<()> {
    let (vhost, bus) = connected().await?;
    let channel = bus.open_channel().await?;
    declare_topology(&channel).await?;
    declare_topology(&channel).await?;

    // what an outside client publishing commands would do
    channel
        .exchange_declare(
            ShortString::from(COMMANDS_EXCHANGE),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    assert!(
        channel.status().connected(),
        "the channel survived every declare"
    );

    // and a second program connecting declares it all again
    let _second = bus::Bus::connect(&vhost.url).await?;

    let types = vhost.queue_types().await?;
    for queue in all_queues() {
        assert!(
            types
                .iter()
                .any(|(name, kind)| name == queue && kind == "quorum"),
            "{queue} is a quorum queue: {types:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_bad_url_is_an_error_that_does_not_show_the_password() -> anyhow::Result<()> {
    let err = bus::Bus::connect("not a url with s3cret").await.err();
    let text = format!(
        "{:?}",
        err.ok_or_else(|| anyhow::anyhow!("connect succeeded"))?
    );
    assert!(!text.contains("s3cret"), "{text}");
    Ok(())
}
