use testkit::TestDb;

#[tokio::test]
async fn connect_creates_a_missing_database_and_migrates_it() -> anyhow::Result<()> {
    // TestDb names a database that does not exist yet; connect() creates it.
    let db = TestDb::new().await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&db.name)
            .fetch_one(db.pool())
            .await?;
    assert!(exists);
    assert_eq!(db.store.count().await?, 0);

    // Connecting again to the existing database is fine and re-applies nothing.
    let again = eventstore::connect(db.url()).await?;
    assert_eq!(again.count().await?, 0);
    again.pool().close().await;
    Ok(())
}

#[tokio::test]
async fn connecting_with_bad_credentials_fails_without_showing_the_password() -> anyhow::Result<()>
{
    let result =
        eventstore::connect("postgres://no_such_role:hunter2@127.0.0.1:5432/no_such_db").await;
    let Err(error) = result else {
        anyhow::bail!("connecting as a role that does not exist succeeded");
    };
    assert!(!error.to_string().contains("hunter2"), "{error}");
    Ok(())
}
