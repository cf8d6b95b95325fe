// The page's own script (/internal/cache/ui/page.js): refreshes <main> every few seconds while open (pausable) and
// sends the actions, each a PUT /internal/cache/config with the body its button carries. The admin token lives in
// this closure only: never in storage, a cookie or the URL.
(() => {
  'use strict';
  const $ = (id) => document.getElementById(id);
  let token = null;
  let paused = false;
  let busy = false;

  const say = (text, ok) => {
    const r = $('result');
    r.textContent = text;
    r.className = ok ? 'ok' : 'bad';
  };
  const auth = () => (token ? { Authorization: 'Bearer ' + token } : {});
  const errorOf = (text) => {
    try {
      return JSON.parse(text).error || text;
    } catch (_) {
      return text;
    }
  };

  async function refresh() {
    if (busy) return;
    busy = true;
    const query = new URLSearchParams(window.location.search);
    query.set('part', 'main');
    try {
      const r = await fetch('/internal/cache/ui?' + query, { headers: auth(), cache: 'no-store' });
      const text = await r.text();
      if (!r.ok) {
        say('Reading the page: ' + r.status + ', ' + errorOf(text), false);
        return;
      }
      // Keep the open "why" lists open across a refresh.
      const open = new Set([...document.querySelectorAll('main details[open]')].map((d) =>
        d.closest('[data-pattern]')?.dataset.pattern));
      $('main').innerHTML = text;
      document.querySelectorAll('main [data-pattern] > details').forEach((d) => {
        if (open.has(d.closest('[data-pattern]').dataset.pattern)) d.open = true;
      });
      $('updated').textContent = 'updated ' + new Date().toLocaleTimeString();
      document.body.dataset.loaded = '1';
      delete document.body.dataset.needsToken;
    } catch (e) {
      say('Reading the page failed: ' + e, false);
    } finally {
      busy = false;
    }
  }

  async function put(body, what) {
    say(what + ': sending…', true);
    try {
      const r = await fetch('/internal/cache/config', {
        method: 'PUT',
        headers: { ...auth(), 'Content-Type': 'application/json' },
        body,
      });
      const text = await r.text();
      if (r.ok) {
        const s = JSON.parse(text);
        say(what + ': done (state version ' + s.version + ', impl ' + s.impl + ', whitelist ' +
          (s.whitelist.join(', ') || 'none') + ')', true);
        await refresh();
      } else {
        say(what + ': refused, ' + r.status + ': ' + errorOf(text), false);
      }
    } catch (e) {
      say(what + ': failed: ' + e, false);
    }
  }

  document.addEventListener('click', (ev) => {
    const b = ev.target.closest('button[data-body]');
    if (!b) return;
    const what = b.dataset.pattern ? b.dataset.pattern + ' → ' + b.dataset.action : b.dataset.action;
    put(b.dataset.body, what);
  });

  document.addEventListener('DOMContentLoaded', () => {
    $('token-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const input = $('token');
      token = input.value.trim() || null;
      input.value = '';
      $('token-state').textContent = token
        ? 'token set (kept in this page only, until it is closed or reloaded)'
        : 'no token (actions are refused)';
      refresh();
    });
    $('pause').addEventListener('click', () => {
      paused = !paused;
      $('pause').textContent = paused ? 'Resume refresh' : 'Pause refresh';
      $('pause').setAttribute('aria-pressed', String(paused));
      $('updated').textContent = paused ? 'paused' : 'refreshing';
    });
    const period = Number(document.body.dataset.refreshMs) || 5000;
    setInterval(() => {
      if (!paused && !document.hidden && !document.body.dataset.needsToken) refresh();
    }, period);
  });
})();
