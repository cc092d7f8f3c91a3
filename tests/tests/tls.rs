//! `amqps://` and Postgres over TLS against real servers with TLS listeners: a RabbitMQ node
//! and a Postgres cluster of the test's own, with certificates from a throwaway CA. Each
//! test starts its server once (a RabbitMQ node takes seconds) and goes through its cases.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use gantry_shared::config::Config;
use gantry_shared::message::TaskId;
use gantry_shared::store::Store;
use gantry_shared::{Error, amqp, retry};
use gantry_tests::tls::{Ca, TlsPostgres, TlsRabbitMq};
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use secrecy::{ExposeSecret, SecretString};

const TIMEOUT: Duration = Duration::from_secs(10);
/// How long to try connecting: these servers are up before the tests connect.
const QUICK: Duration = Duration::from_secs(2);

#[tokio::test]
async fn rabbitmq_over_tls_trusts_its_ca_file_and_refuses_a_broker_another_ca_signed() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let ca = Ca::new(dir.path(), "ca", "Gantry test CA")?;
    // The same name, another key: what a regenerated or impostor CA looks like.
    let other_ca = Ca::new(dir.path(), "other-ca", "Gantry test CA")?;
    let broker = TlsRabbitMq::start(&ca.issue("broker", &["DNS:localhost", "IP:127.0.0.1"])?)?;
    let ca_file = ca.cert.display();

    for host in ["localhost", "127.0.0.1"] {
        let url = broker.url(host, &format!("cacertfile={ca_file}"));
        publishes_and_consumes_one_message(&url.into())
            .await
            .with_context(|| format!("over amqps:// to {host}"))?;
    }

    // GANTRY_TLS_CA_FILE's way: the configuration writes the CA file into the URL.
    let mut config = Config {
        amqp_url: broker.url("localhost", "").into(),
        tls_ca_file: Some(ca.cert.clone()),
        ..Config::default()
    };
    config.apply_tls_ca_file()?;
    let publisher = amqp::Publisher::connect(&config.amqp_url, "gantry-tls-test", TIMEOUT).await?;
    publisher.close().await;

    let refused = amqp::connect(
        &broker
            .url(
                "localhost",
                &format!("cacertfile={}", other_ca.cert.display()),
            )
            .into(),
        "gantry-tls-test",
        TIMEOUT,
    )
    .await
    .err()
    .context("a broker the CA file did not sign was trusted")?;
    let message = refused.to_string();
    assert!(matches!(refused, Error::TlsCertificate { .. }), "{message}");
    assert!(
        message.contains(&format!("localhost:{}", broker.port))
            && message.contains(&format!(
                "not signed by the CA in {}",
                other_ca.cert.display()
            ))
            && message.contains("GANTRY_TLS_CA_FILE"),
        "{message}"
    );
    assert!(!refused.is_transient(), "{message}");

    // Nothing signed this broker that the system trusts.
    let refused = amqp::connect(
        &broker.url("localhost", "").into(),
        "gantry-tls-test",
        TIMEOUT,
    )
    .await
    .err()
    .context("the system's roots trusted a throwaway CA")?
    .to_string();
    assert!(
        refused.contains("not signed by any of the system's trusted roots"),
        "{refused}"
    );

    // A missing CA file fails at once, however patient the caller.
    let missing = dir.path().join("missing.pem");
    let url = broker.url("localhost", &format!("cacertfile={}", missing.display()));
    let refused = tokio::time::timeout(
        TIMEOUT,
        amqp::connect_with_retry(&url.into(), "gantry-tls-test", TIMEOUT, retry::forever()),
    )
    .await
    .context("a missing CA file was retried")?
    .err()
    .context("connected without its CA file")?;
    assert!(
        matches!(&refused, Error::TlsCaFile { path, .. } if path.ends_with("missing.pem")),
        "{refused}"
    );
    Ok(())
}

/// Declares a queue of its own, publishes one message to it with a confirm, and consumes it.
async fn publishes_and_consumes_one_message(url: &SecretString) -> Result<()> {
    let conn = amqp::connect(url, "gantry-tls-test", TIMEOUT).await?;
    let channel = amqp::confirm_channel(&conn, TIMEOUT).await?;
    let queue = format!("gantry-tls-test-{}", TaskId::new());
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    amqp::publish_confirmed(
        &channel,
        "",
        &queue,
        b"over TLS",
        BasicProperties::default(),
        true,
        TIMEOUT,
    )
    .await?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "gantry-tls-test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let delivery = tokio::time::timeout(TIMEOUT, consumer.next())
        .await
        .context("no message came back")?
        .context("the consumer ended")??;
    if delivery.data != b"over TLS" {
        bail!("another message came back: {:?}", delivery.data);
    }
    delivery.ack(BasicAckOptions::default()).await?;
    conn.close(200, "bye".into()).await?;
    Ok(())
}

#[tokio::test]
async fn postgres_over_tls_checks_the_chain_and_the_name_as_sslmode_says() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new(dir.path(), "ca", "Gantry test CA")?;
    let other_ca = Ca::new(dir.path(), "other-ca", "Gantry test CA")?;
    // A certificate for a name only: reached by address, it names another host.
    let server = TlsPostgres::start(&ca.issue("postgres", &["DNS:db.gantry.test"])?)?;
    let ca_file = ca.cert.display();

    // verify-full: the name as the certificate has it, the address beside it.
    let by_name = server.url(
        "db.gantry.test",
        &format!("hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={ca_file}"),
    );
    let (store, migrated) =
        Store::connect_and_migrate(&by_name.into(), 2, retry::for_at_most(QUICK)).await?;
    assert_eq!(migrated.found, 0);
    assert!(!migrated.applied.is_empty());
    assert!(store.task(TaskId::new()).await?.is_none());

    // verify-ca: the chain only, so the address will do; GANTRY_TLS_CA_FILE's way.
    let mut config = Config {
        database_url: server.url("127.0.0.1", "sslmode=verify-ca").into(),
        tls_ca_file: Some(ca.cert.clone()),
        ..Config::default()
    };
    config.apply_tls_ca_file()?;
    let store = Store::connect_existing(&config.database_url, 2, retry::for_at_most(QUICK)).await?;
    assert!(store.task(TaskId::new()).await?.is_none());
    // `LISTEN` has a connection of its own (`gantry wait`, the dispatcher's cancels).
    let mut finished = store.terminal_notifications().await?;
    let id = TaskId::new();
    store.cancel(id, "a test of notifications over TLS").await?;
    let heard = tokio::time::timeout(TIMEOUT, finished.recv())
        .await
        .context("the cancel was not heard")?;
    assert_eq!(heard, Some(id));
    // So have the batched writes of `gantry dlq` (beside the pool), over TLS as well.
    let apart = store.connection_apart("gantry-test").await?;
    let row = apart
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    assert!(row.get::<_, bool>(0), "a connection apart went without TLS");

    // verify-full by address: the certificate does not name it.
    let by_address = server.url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca_file}"),
    );
    let refused = refused_by(&by_address).await?;
    assert!(
        refused.contains(&format!("127.0.0.1:{}", server.port))
            && refused.contains("does not name the host"),
        "{refused}"
    );

    // Another CA's file.
    let other = server.url(
        "db.gantry.test",
        &format!(
            "hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={}",
            other_ca.cert.display()
        ),
    );
    let refused = refused_by(&other).await?;
    assert!(
        refused.contains(&format!("db.gantry.test:{}", server.port))
            && refused.contains(&format!(
                "not signed by the CA in {}",
                other_ca.cert.display()
            ))
            && refused.contains("GANTRY_TLS_CA_FILE"),
        "{refused}"
    );

    // Without TLS the server takes no one (hostssl only): the plain URL is still plain.
    let plain = Store::connect_existing(
        &server.url("127.0.0.1", "").into(),
        1,
        retry::for_at_most(QUICK),
    )
    .await
    .err()
    .context("a plain connection was taken")?;
    let plain = format!("{:#}", anyhow::Error::from(plain));
    assert!(plain.contains("no encryption"), "{plain}");
    Ok(())
}

/// The message of the error that refusing the server's certificate gives, at once (the
/// error says it cannot pass, so nothing retries it).
async fn refused_by(url: &str) -> Result<String> {
    let url: SecretString = url.into();
    let patient = retry::forever();
    let refused = tokio::time::timeout(TIMEOUT, Store::connect_existing(&url, 1, patient))
        .await
        .context("a refused certificate was retried")?
        .err()
        .with_context(|| format!("{} was trusted", url.expose_secret()))?;
    assert!(
        matches!(refused, Error::TlsCertificate { .. }),
        "{refused:?}"
    );
    Ok(refused.to_string())
}
