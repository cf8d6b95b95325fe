// The page's own script (/internal/cache/ui/page.js): refreshes <main> every few seconds while open (pausable) and
// sends the actions, each a PUT /internal/cache/config with the body its button carries, read from a page fetched
// just before (so a change made meanwhile, here or elsewhere, is not undone). The admin token lives in this closure
// only: never in storage, a cookie or the URL.
(() => {
  'use strict';
  const $ = (id) => document.getElementById(id);
  let token = null;
  let paused = false;
  // The newest refresh wins: an older one that answers later is dropped.
  let generation = 0;
  // Actions under way: the timer leaves the page alone meanwhile.
  let acting = 0;

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
  const css = (v) => (window.CSS && CSS.escape ? CSS.escape(v) : v.replace(/["\\]/g, '\\$&'));

  // Replaces <main> with the server's; `forced` refreshes run even while paused (after an action). Returns 'ok'
  // when <main> was replaced, 'superseded' when a newer refresh took over, else what went wrong.
  async function refresh(forced) {
    const mine = ++generation;
    const query = new URLSearchParams(window.location.search);
    query.set('part', 'main');
    let r;
    let text;
    try {
      r = await fetch('/internal/cache/ui?' + query, { headers: auth(), cache: 'no-store' });
      text = await r.text();
    } catch (e) {
      const why = 'reading the page failed: ' + e;
      if (mine === generation) say(why, false);
      return why;
    }
    if (mine !== generation) return 'superseded';
    if (!r.ok) {
      const why = 'reading the page: ' + r.status + ', ' + errorOf(text);
      say(why, false);
      // Refused (a token rotated, or none given): stop polling until a token is entered again.
      if (r.status === 401 || r.status === 403) document.body.dataset.needsToken = '1';
      return why;
    }
    if (paused && !forced) return 'superseded';
    // Keep the open "why" lists open and the focused button focused across the refresh.
    const open = new Set([...document.querySelectorAll('main details[open]')]
      .map((d) => d.closest('[data-pattern]')?.dataset.pattern));
    const focused = document.activeElement?.closest?.('main button[data-action]');
    const refocus = focused ? [focused.dataset.pattern, focused.dataset.action] : null;
    $('main').innerHTML = text;
    document.querySelectorAll('main [data-pattern] > details').forEach((d) => {
      if (open.has(d.closest('[data-pattern]').dataset.pattern)) d.open = true;
    });
    if (refocus) find(refocus[0], refocus[1])?.focus();
    if (!paused) $('updated').textContent = 'updated ' + new Date().toLocaleTimeString();
    delete document.body.dataset.needsToken;
    return 'ok';
  }

  // The button of `action` (for `pattern`, or the page's own when there is none) in the current <main>.
  function find(pattern, action) {
    const of = pattern ? '[data-pattern="' + css(pattern) + '"]' : ':not([data-pattern])';
    return document.querySelector('main button[data-action="' + css(action) + '"]' + of);
  }

  async function act(pattern, action) {
    const what = pattern ? pattern + ' → ' + action : action;
    say(what + ': sending…', true);
    acting++;
    try {
      await send(pattern, what, action);
    } finally {
      acting--;
    }
  }

  async function send(pattern, what, action) {
    // The body from the state as it is now, not as it was when the page was drawn.
    const read = await refresh(true);
    if (read !== 'ok' && read !== 'superseded') {
      say(what + ': not sent, ' + read, false);
      return;
    }
    const button = find(pattern, action);
    if (!button) {
      say(what + ': not sent, the page no longer offers it', false);
      return;
    }
    say(what + ': sending…', true);
    try {
      const r = await fetch('/internal/cache/config', {
        method: 'PUT',
        headers: { ...auth(), 'Content-Type': 'application/json' },
        body: button.dataset.body,
      });
      const text = await r.text();
      if (r.ok) {
        const s = JSON.parse(text);
        say(what + ': done (state version ' + s.version + ', impl ' + s.impl + ', whitelist ' +
          (s.whitelist.join(', ') || 'none') + ')', true);
        await refresh(true);
      } else {
        say(what + ': refused, ' + r.status + ': ' + errorOf(text), false);
      }
    } catch (e) {
      say(what + ': failed: ' + e, false);
    }
  }

  document.addEventListener('click', (ev) => {
    const b = ev.target.closest('main button[data-action]');
    if (b) act(b.dataset.pattern, b.dataset.action);
  });

  document.addEventListener('DOMContentLoaded', () => {
    const form = $('token-form');
    form.querySelectorAll('[disabled]').forEach((e) => { e.disabled = false; });
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const input = $('token');
      token = input.value.trim() || null;
      input.value = '';
      $('token-state').textContent = token
        ? 'token set (kept in this page only, until it is closed or reloaded)'
        : 'no token (actions are refused)';
      refresh(true);
    });
    // The what-if budget without a reload, so that a token typed in stays.
    $('memory-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const query = new URLSearchParams(window.location.search);
      const memory = $('memory').value.trim();
      if (memory) query.set('memory', memory); else query.delete('memory');
      const q = query.toString();
      window.history.replaceState(null, '', window.location.pathname + (q ? '?' + q : ''));
      refresh(true);
    });
    $('pause').addEventListener('click', () => {
      paused = !paused;
      $('pause').textContent = paused ? 'Resume refresh' : 'Pause refresh';
      $('pause').setAttribute('aria-pressed', String(paused));
      $('updated').textContent = paused ? 'paused' : 'refreshing';
    });
    const period = Number(document.body.dataset.refreshMs) || 5000;
    setInterval(() => {
      if (!paused && !acting && !document.hidden && !document.body.dataset.needsToken) refresh(false);
    }, period);
  });
})();
