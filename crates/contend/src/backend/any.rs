//! `sqlx::Any`: the backend is chosen at run time by the pool's URL (the lab, the service, the
//! CLI). Everything else is the same as for the typed databases; statements are those of the
//! backend the URL names.

use super::Backend;

super::impl_database!(
    sqlx::Any,
    backend: |pool| Backend::from_url(pool.connect_options().database_url.as_str()),
    url: |pool| Some(pool.connect_options().database_url.to_string())
);
