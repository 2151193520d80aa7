//! Commands that act: RELOAD, RECONNECT, PAUSE, RESUME.

use bytes::BytesMut;

use super::wire::command_complete;
use crate::client::ClientContext;

/// Re-reads the Secret now (a changed DSN is validated and applied as usual).
pub fn reload(ctx: &ClientContext, out: &mut BytesMut) {
    ctx.pool.stats().reload_requested("admin");
    let asked = ctx.pool.credentials().reload();
    tracing::info!(
        watcher_running = asked,
        "admin RELOAD: re-reading the DSN file"
    );
    command_complete(out, "RELOAD");
}

/// Retires every server connection at its next safe point.
pub fn reconnect(ctx: &ClientContext, out: &mut BytesMut) {
    let closed = ctx.pool.reconnect();
    tracing::info!(
        closed_idle = closed,
        "admin RECONNECT: idle server connections closed, busy ones close when released"
    );
    command_complete(out, "RECONNECT");
}

pub fn pause(ctx: &ClientContext, out: &mut BytesMut) {
    ctx.pool.pause();
    tracing::info!("admin PAUSE: new server assignments are held until RESUME");
    command_complete(out, "PAUSE");
}

pub fn resume(ctx: &ClientContext, out: &mut BytesMut) {
    ctx.pool.resume();
    tracing::info!("admin RESUME: server assignments continue");
    command_complete(out, "RESUME");
}
