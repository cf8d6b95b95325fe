//! An existing axum service over a slow origin (a bookshop whose database answers in 20 ms), with cache-rollout
//! added. Every line marked `// cache-rollout` is the integration; nothing else changed. `docs/integration.md`
//! shows the diff and walks through it; `tests/integration.rs` runs this program against a real Redis.
//!
//! What the integration brings: every `book` read observed through the NullCache (`/internal/cache`,
//! `/metrics`), Redis switched on at runtime with `PUT /internal/cache/config`, the fleet state followed when
//! `[cache.fleet] enabled = true`, the configuration re-read on SIGHUP, and `/internal/` answering 404 when
//! `APP_ENV=production`.
//!
//! Run it from a directory with a `config/default.toml` (or none: built-in defaults, with a warning), on a Redis
//! of your own:
//!
//! ```sh
//! redis-server --port 6390 --save '' --appendonly no --daemonize yes
//! REDIS_URL=redis://127.0.0.1:6390 CACHE_ADMIN_TOKEN=change-me-0123456789 \
//!   cargo run --example existing_service
//! curl -s localhost:8901/books/1
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use cache_rollout::{CacheRegistry, CacheRollout}; // cache-rollout
use serde::{Deserialize, Serialize};

/// A row of the origin.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Book {
    id: u64,
    title: String,
    stock: u32,
}

/// The origin's failure.
#[derive(Debug)]
struct DbError;

/// The slow origin: every query takes 20 ms.
#[derive(Clone)]
struct Db(Arc<Mutex<HashMap<u64, Book>>>);

impl Db {
    fn seeded(n: u64) -> Self {
        let books = (1..=n)
            .map(|id| {
                let title = format!("Book {id}");
                (
                    id,
                    Book {
                        id,
                        title,
                        stock: 10,
                    },
                )
            })
            .collect();
        Db(Arc::new(Mutex::new(books)))
    }

    async fn book(&self, id: u64) -> Result<Option<Book>, DbError> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(self.0.lock().map_err(|_| DbError)?.get(&id).cloned())
    }

    async fn set_stock(&self, id: u64, stock: u32) -> Result<bool, DbError> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut books = self.0.lock().map_err(|_| DbError)?;
        Ok(books.get_mut(&id).map(|b| b.stock = stock).is_some())
    }
}

#[derive(Clone)]
struct AppState {
    db: Db,
    cache: CacheRegistry, // cache-rollout
}

async fn get_book(
    State(s): State<AppState>,
    Path(id): Path<u64>,
) -> Result<Json<Book>, StatusCode> {
    let book = s
        .cache // cache-rollout
        .get_or_load(&format!("book:{id}"), || s.db.book(id)) // cache-rollout (was: s.db.book(id))
        .await
        .map_err(|DbError| StatusCode::INTERNAL_SERVER_ERROR)?;
    book.map(Json).ok_or(StatusCode::NOT_FOUND)
}

#[derive(Deserialize)]
struct Stock {
    stock: u32,
}

async fn put_stock(
    State(s): State<AppState>,
    Path(id): Path<u64>,
    Json(body): Json<Stock>,
) -> StatusCode {
    match s.db.set_stock(id, body.stock).await {
        Ok(true) => {
            // cache-rollout: the write succeeded; a failed invalidation (also counted in cache_errors_total)
            // means the cached copy may stay stale until its TTL.
            if let Err(e) = s.cache.invalidate(&format!("book:{id}")).await {
                tracing::warn!(error = %e, "book:{id} may be stale until its TTL");
            }
            StatusCode::NO_CONTENT
        }
        Ok(false) => StatusCode::NOT_FOUND,
        Err(DbError) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    // The application's own configuration: here only its listen address.
    let addr: SocketAddr = std::env::var("BIND_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:8901".into())
        .parse()?;

    let cache = CacheRollout::builder("bookshop") // cache-rollout
        .reload_on_sighup(true) // cache-rollout
        .build() // cache-rollout
        .await?; // cache-rollout
    let state = AppState {
        db: Db::seeded(100),
        cache: cache.registry().clone(), // cache-rollout
    };
    let app = Router::new()
        .route("/books/{id}", get(get_book).put(put_stock))
        .route("/health", get(|| async { "ok" }))
        .with_state(state)
        .layer(cache.layer()) // cache-rollout
        .merge(cache.router()); // cache-rollout

    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "bookshop listening");
    axum::serve(listener, app).await?;
    Ok(())
}
