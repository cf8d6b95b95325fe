//! The reference service: a small catalog API over an embedded SQLite database, cached through the registry.
//!
//! | route | origin query | cache key |
//! |---|---|---|
//! | `GET /users/{id}` | one user | `user:{id}` |
//! | `GET /projects/{id}` | one project | `project:{id}` |
//! | `GET /projects/{id}/members` | a project's members | `project:{id}:members` |
//! | `PUT /users/{id}` | updates the user, then invalidates `user:{id}` and the member lists that show the user | |
//!
//! plus `GET /health`, `GET /metrics`, and `/internal/cache` (404 in production). The database lives in memory and
//! is created and seeded at start-up, so the service needs nothing installed; `serve --database FILE` keeps it in
//! a SQLite file instead, which several instances can share (created and seeded by the first, WAL journal), so a
//! write through one instance is what the others read.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use cache_rollout::registry::Fetch;
use cache_rollout::{CacheRegistry, CacheRollout};

/// A user row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct User {
    /// Primary key.
    pub(crate) id: i64,
    /// Display name.
    pub(crate) name: String,
    /// E-mail address.
    pub(crate) email: String,
}

/// A project row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Project {
    /// Primary key.
    pub(crate) id: i64,
    /// Project name.
    pub(crate) name: String,
    /// Owning user's id.
    pub(crate) owner_id: i64,
}

/// One member of a project.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Member {
    /// The user's id.
    pub(crate) user_id: i64,
    /// The user's name.
    pub(crate) name: String,
    /// `owner`, `maintainer` or `viewer`.
    pub(crate) role: String,
}

/// Body of `PUT /users/{id}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UserUpdate {
    /// New display name.
    pub(crate) name: String,
    /// New e-mail address.
    pub(crate) email: String,
}

/// The origin: a SQLite database (in memory, or a file shared by instances) behind a mutex, queried on Tokio's
/// blocking pool.
#[derive(Clone)]
pub(crate) struct Origin {
    conn: Arc<Mutex<Connection>>,
    delay: Duration,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("delay", &self.delay)
            .finish_non_exhaustive()
    }
}

/// Origin failure (a SQLite error or a panicked query task).
#[derive(Debug, thiserror::Error)]
#[error("origin: {0}")]
pub(crate) struct OriginError(String);

impl Origin {
    /// Creates and seeds the database: `users` users (ids 1..=users), `users / 10` projects (at least 1), each with
    /// five members. `delay` is added to every query to stand in for a slow origin.
    ///
    /// # Errors
    /// A SQLite error (which an in-memory database only gives when out of memory).
    pub(crate) fn seeded(users: i64, delay: Duration) -> Result<Self, OriginError> {
        let conn = Connection::open_in_memory().map_err(|e| OriginError(e.to_string()))?;
        seed(&conn, users).map_err(|e| OriginError(e.to_string()))?;
        Ok(Origin {
            conn: Arc::new(Mutex::new(conn)),
            delay,
        })
    }

    /// Opens the database in the SQLite file `path`, which other instances may share: it is created and seeded
    /// (as [`Origin::seeded`]) by the first to open it, in one exclusive transaction, and left as it is by the
    /// others, whatever their `users`. WAL journal; a writer waits up to 5 s for another process's lock.
    ///
    /// # Errors
    /// The file cannot be opened or created, is not a SQLite database, or stays locked for 5 s.
    pub(crate) fn shared(
        path: &std::path::Path,
        users: i64,
        delay: Duration,
    ) -> Result<Self, OriginError> {
        let err = |e: rusqlite::Error| OriginError(format!("{}: {e}", path.display()));
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(OriginError(format!(
                "{}: journal mode {mode}, not WAL: is it on a file system SQLite can share?",
                path.display()
            )));
        }
        conn.execute_batch("BEGIN EXCLUSIVE;").map_err(err)?;
        let exists: bool = conn
            .query_row(
                "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'users'",
                [],
                |r| r.get(0),
            )
            .map_err(err)?;
        let seeded = if exists {
            conn.execute_batch("COMMIT;")
        } else {
            seed_tables(&conn, users).and_then(|()| conn.execute_batch("COMMIT;"))
        };
        if let Err(e) = seeded {
            let _ = conn.execute_batch("ROLLBACK;");
            return Err(err(e));
        }
        Ok(Origin {
            conn: Arc::new(Mutex::new(conn)),
            delay,
        })
    }

    async fn query<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, OriginError> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let c = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&c)
        })
        .await
        .map_err(|e| OriginError(e.to_string()))?
        .map_err(|e| OriginError(e.to_string()))
    }

    /// One user.
    ///
    /// # Errors
    /// [`OriginError`].
    pub(crate) async fn user(&self, id: i64) -> Result<Option<User>, OriginError> {
        self.query(move |c| {
            c.query_row(
                "SELECT id, name, email FROM users WHERE id = ?1",
                params![id],
                |r| {
                    Ok(User {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        email: r.get(2)?,
                    })
                },
            )
            .optional()
        })
        .await
    }

    /// One project.
    ///
    /// # Errors
    /// [`OriginError`].
    pub(crate) async fn project(&self, id: i64) -> Result<Option<Project>, OriginError> {
        self.query(move |c| {
            c.query_row(
                "SELECT id, name, owner_id FROM projects WHERE id = ?1",
                params![id],
                |r| {
                    Ok(Project {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        owner_id: r.get(2)?,
                    })
                },
            )
            .optional()
        })
        .await
    }

    /// A project's members, by user id; `None` when the project does not exist.
    ///
    /// # Errors
    /// [`OriginError`].
    pub(crate) async fn members(
        &self,
        project_id: i64,
    ) -> Result<Option<Vec<Member>>, OriginError> {
        self.query(move |c| {
            let exists: Option<i64> = c
                .query_row("SELECT id FROM projects WHERE id = ?1", params![project_id], |r| r.get(0))
                .optional()?;
            if exists.is_none() {
                return Ok(None);
            }
            let mut st = c.prepare(
                "SELECT u.id, u.name, m.role FROM project_members m JOIN users u ON u.id = m.user_id \
                 WHERE m.project_id = ?1 ORDER BY u.id",
            )?;
            let rows = st.query_map(params![project_id], |r| {
                Ok(Member {
                    user_id: r.get(0)?,
                    name: r.get(1)?,
                    role: r.get(2)?,
                })
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map(Some)
        })
        .await
    }

    /// Ids of the projects `user_id` is a member of.
    ///
    /// # Errors
    /// [`OriginError`].
    pub(crate) async fn projects_of(&self, user_id: i64) -> Result<Vec<i64>, OriginError> {
        self.query(move |c| {
            let mut st = c.prepare("SELECT project_id FROM project_members WHERE user_id = ?1")?;
            let rows = st.query_map(params![user_id], |r| r.get(0))?;
            rows.collect()
        })
        .await
    }

    /// Updates a user; `false` when there is no such user.
    ///
    /// # Errors
    /// [`OriginError`].
    pub(crate) async fn update_user(
        &self,
        id: i64,
        update: UserUpdate,
    ) -> Result<bool, OriginError> {
        self.query(move |c| {
            c.execute(
                "UPDATE users SET name = ?2, email = ?3 WHERE id = ?1",
                params![id, update.name, update.email],
            )
            .map(|n| n > 0)
        })
        .await
    }
}

fn seed(c: &Connection, users: i64) -> rusqlite::Result<()> {
    c.execute_batch("BEGIN;")?;
    seed_tables(c, users)?;
    c.execute_batch("COMMIT;")
}

/// Creates and fills the tables, inside the caller's transaction.
fn seed_tables(c: &Connection, users: i64) -> rusqlite::Result<()> {
    c.execute_batch(
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL);
         CREATE TABLE projects (id INTEGER PRIMARY KEY, name TEXT NOT NULL, owner_id INTEGER NOT NULL REFERENCES users(id));
         CREATE TABLE project_members (project_id INTEGER NOT NULL REFERENCES projects(id),
                                       user_id INTEGER NOT NULL REFERENCES users(id), role TEXT NOT NULL,
                                       PRIMARY KEY (project_id, user_id));",
    )?;
    let users = users.max(1);
    {
        let mut u = c.prepare("INSERT INTO users (id, name, email) VALUES (?1, ?2, ?3)")?;
        for id in 1..=users {
            u.execute(params![
                id,
                format!("User {id}"),
                format!("user{id}@example.com")
            ])?;
        }
        let mut p = c.prepare("INSERT INTO projects (id, name, owner_id) VALUES (?1, ?2, ?3)")?;
        let mut m = c.prepare(
            "INSERT INTO project_members (project_id, user_id, role) VALUES (?1, ?2, ?3)",
        )?;
        for id in 1..=(users / 10).max(1) {
            let owner = (id * 7) % users + 1;
            p.execute(params![id, format!("Project {id}"), owner])?;
            m.execute(params![id, owner, "owner"])?;
            for k in 1..5 {
                let member = (owner + k * 13) % users + 1;
                if member != owner {
                    m.execute(params![
                        id,
                        member,
                        if k == 1 { "maintainer" } else { "viewer" }
                    ])?;
                }
            }
        }
    }
    Ok(())
}

/// Shared state of the catalog handlers.
#[derive(Clone, Debug)]
pub(crate) struct AppContext {
    /// The cache registry.
    pub(crate) registry: CacheRegistry,
    /// The origin database.
    pub(crate) origin: Origin,
}

/// The whole reference service as a router (testable with `tower::ServiceExt::oneshot`), built on the library's
/// public entry point like any application's: its own routes, the candidate-route layer, and the library's router
/// for `/metrics` and `/internal/cache`.
pub(crate) fn app(cache: &CacheRollout, origin: Origin) -> Router {
    let ctx = AppContext {
        registry: cache.registry().clone(),
        origin,
    };
    Router::new()
        .route("/users/{id}", get(get_user).put(put_user))
        .route("/projects/{id}", get(get_project))
        .route("/projects/{id}/members", get(get_members))
        // An explicit fallback, so that the layer below also counts requests that matched no route.
        .fallback(|| async { found(None::<()>) })
        .with_state(ctx)
        .layer(cache.layer())
        .route(
            "/health",
            get(|| async { Json(serde_json::json!({ "status": "ok" })) }),
        )
        .merge(cache.router())
}

/// A numeric `{id}` of the path; anything else is a JSON 400, like every other error of the API (axum's own
/// rejection is plain text).
struct Id(i64);

impl<S: Send + Sync> FromRequestParts<S> for Id {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(raw)) => raw
                .parse()
                .map(Id)
                .map_err(|_| bad_request(format!("id {raw:?} is not an integer"))),
            Err(e) => Err(json_error(e.status(), e.body_text())),
        }
    }
}

fn bad_request(message: String) -> Response {
    json_error(StatusCode::BAD_REQUEST, message)
}

fn json_error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

fn origin_error(e: &OriginError) -> Response {
    tracing::error!(error = %e, "origin failed");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(serde_json::json!({ "error": "origin unavailable" })),
    )
        .into_response()
}

fn found<T: Serialize>(v: Option<T>) -> Response {
    match v {
        Some(v) => Json(v).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({ "error": "not found" })),
        )
            .into_response(),
    }
}

/// The reads go through [`CacheRegistry::fetch`]: a loader that owns what it needs (so that a stale-while-revalidate
/// refresh runs in the background), absences marked (`cache_negative_secs`), any origin error answerable with a
/// stale value (`stale_if_error_secs`). The response's `Cache-Status` says which happened.
async fn read<T>(
    ctx: &AppContext,
    key: String,
    load: impl Future<Output = Result<Option<T>, OriginError>> + Send + 'static,
) -> Response
where
    T: Serialize + serde::de::DeserializeOwned + Send + 'static,
{
    match ctx
        .registry
        .fetch(&key, Fetch::new().absent_if(Option::is_none), move || load)
        .await
    {
        Ok(v) => found(v.value),
        Err(e) => origin_error(&e),
    }
}

async fn get_user(State(ctx): State<AppContext>, Id(id): Id) -> Response {
    let origin = ctx.origin.clone();
    read(
        &ctx,
        format!("user:{id}"),
        async move { origin.user(id).await },
    )
    .await
}

async fn get_project(State(ctx): State<AppContext>, Id(id): Id) -> Response {
    let origin = ctx.origin.clone();
    read(&ctx, format!("project:{id}"), async move {
        origin.project(id).await
    })
    .await
}

async fn get_members(State(ctx): State<AppContext>, Id(id): Id) -> Response {
    let origin = ctx.origin.clone();
    read(&ctx, format!("project:{id}:members"), async move {
        origin.members(id).await
    })
    .await
}

async fn put_user(
    State(ctx): State<AppContext>,
    Id(id): Id,
    update: Result<Json<UserUpdate>, JsonRejection>,
) -> Response {
    let update = match update {
        Ok(Json(u)) => u,
        Err(e) => return json_error(e.status(), e.body_text()),
    };
    match ctx.origin.update_user(id, update).await {
        Ok(false) => found(None::<()>),
        Ok(true) => {
            // The user's own entry first, whatever happens next; member lists embed the name, so they go too.
            let mut failed: Option<String> = ctx
                .registry
                .invalidate(&format!("user:{id}"))
                .await
                .err()
                .map(|e| e.to_string());
            match ctx.origin.projects_of(id).await {
                Ok(projects) => {
                    for p in projects {
                        if let Err(e) = ctx
                            .registry
                            .invalidate(&format!("project:{p}:members"))
                            .await
                        {
                            failed = Some(e.to_string());
                        }
                    }
                }
                Err(e) => failed = Some(format!("cannot list the user's projects: {e}")),
            }
            if let Some(e) = failed {
                // The write is done; the cached copy may live until its TTL. Say so rather than hide it.
                tracing::error!(id, error = %e, "user updated but its cache entry could not be invalidated");
                return (
                    StatusCode::OK,
                    [(
                        "warning",
                        "199 - \"cache invalidation failed; stale reads possible until TTL\"",
                    )],
                    Json(serde_json::json!({ "updated": id })),
                )
                    .into_response();
            }
            Json(serde_json::json!({ "updated": id })).into_response()
        }
        Err(e) => origin_error(&e),
    }
}
