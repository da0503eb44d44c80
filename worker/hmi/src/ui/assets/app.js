// airlock HMI: the operator page. Vanilla JS, no dependencies, nothing from the network but
// this origin's /api. Every value from the server reaches the page through textContent,
// never as markup.
'use strict';

(function () {
  const VALUES_EVERY_MS = 1000;
  const TREND_EVERY_MS = 5000;

  const $ = (id) => document.getElementById(id);

  // A new generation stops the loops of the previous session.
  let generation = 0;
  let tags = [];
  const valueRows = new Map();
  const alarmRows = new Map();
  let trendSeq = 0;

  // ------------------------------------------------------------------ requests

  async function api(method, path, body) {
    const opts = { method: method, credentials: 'same-origin', headers: {}, cache: 'no-store' };
    if (body !== undefined) {
      opts.headers['Content-Type'] = 'application/json';
      opts.body = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(path, opts);
    } catch (e) {
      return { status: 0, data: { error: 'the HMI cannot be reached' } };
    }
    let data = null;
    try {
      data = await res.json();
    } catch (e) {
      data = null;
    }
    return { status: res.status, data: data };
  }

  function errorText(r) {
    if (r.data && typeof r.data.error === 'string') {
      return r.data.error;
    }
    return r.status ? 'HTTP ' + r.status : 'no answer';
  }

  // A 401 on any call ends the session on the page too.
  function sessionLost(r) {
    if (r.status === 401) {
      showLogin('Session ended: ' + errorText(r));
      return true;
    }
    return false;
  }

  function setStatus(text) {
    const s = $('status');
    s.textContent = text;
    s.classList.toggle('error', text !== '');
  }

  // ------------------------------------------------------------------ formatting

  function fmt(v) {
    if (v === null || v === undefined || typeof v !== 'number' || !isFinite(v)) {
      return '\u2014';
    }
    return String(Math.round(v * 1000) / 1000);
  }

  function fmtTime(ms) {
    if (!ms) {
      return '\u2014';
    }
    const d = new Date(ms);
    const p = (n) => String(n).padStart(2, '0');
    return p(d.getHours()) + ':' + p(d.getMinutes()) + ':' + p(d.getSeconds());
  }

  function fmtRange(t) {
    if (t.min === null && t.max === null) {
      return '';
    }
    return fmt(t.min) + ' \u2026 ' + fmt(t.max);
  }

  function cell(row, cls) {
    const td = document.createElement('td');
    if (cls) {
      td.className = cls;
    }
    row.appendChild(td);
    return td;
  }

  // ------------------------------------------------------------------ views

  function showLogin(message) {
    generation += 1;
    $('app-view').hidden = true;
    $('session-bar').hidden = true;
    $('login-view').hidden = false;
    $('who').textContent = '';
    $('login-error').textContent = message || '';
    $('password').value = '';
    $('user').focus();
  }

  function showApp(user) {
    generation += 1;
    const gen = generation;
    $('who').textContent = user;
    $('login-view').hidden = true;
    $('session-bar').hidden = false;
    $('app-view').hidden = false;
    $('login-error').textContent = '';
    setStatus('');
    valuesLoop(gen);
    trendLoop(gen);
  }

  // ------------------------------------------------------------------ values and alarms

  async function valuesLoop(gen) {
    while (gen === generation) {
      await refreshValues(gen);
      if (gen !== generation) {
        return;
      }
      await refreshAlarms(gen);
      await new Promise((resolve) => setTimeout(resolve, VALUES_EVERY_MS));
    }
  }

  async function refreshValues(gen) {
    const r = await api('GET', '/api/values');
    if (gen !== generation || sessionLost(r)) {
      return;
    }
    if (r.status !== 200 || !r.data || !Array.isArray(r.data.tags)) {
      setStatus('Values unavailable: ' + errorText(r));
      return;
    }
    setStatus('');
    renderValues(r.data.tags);
  }

  function renderValues(list) {
    const body = $('values-body');
    const seen = new Set();
    list.forEach((t) => {
      seen.add(t.name);
      let row = valueRows.get(t.name);
      if (!row) {
        row = document.createElement('tr');
        cell(row).textContent = t.name;
        cell(row);
        const v = cell(row, 'num value');
        v.id = 'value-' + t.name;
        cell(row);
        cell(row);
        cell(row);
        cell(row);
        valueRows.set(t.name, row);
      }
      const c = row.children;
      c[1].textContent = t.description || '';
      c[2].textContent = fmt(t.value);
      c[3].textContent = t.unit || '';
      c[4].textContent = fmtRange(t);
      c[5].textContent = fmtTime(t.ts_ms);
      c[6].textContent = t.fault ? 'fault: ' + t.fault : (t.writable ? 'setpoint' : 'ok');
      row.classList.toggle('fault', !!t.fault);
      body.appendChild(row); // keeps the server's order; moving a row keeps its cells
    });
    for (const [name, row] of valueRows) {
      if (!seen.has(name)) {
        row.remove();
        valueRows.delete(name);
      }
    }
    const names = list.map((t) => t.name).join('\n');
    const before = tags.map((t) => t.name).join('\n');
    const writable = list.filter((t) => t.writable).map((t) => t.name).join('\n');
    const writableBefore = tags.filter((t) => t.writable).map((t) => t.name).join('\n');
    tags = list;
    if (names !== before) {
      fillSelect($('trend-tag'), list.map((t) => t.name));
      drawTrend(generation);
    }
    if (writable !== writableBefore) {
      fillSelect($('sp-tag'), list.filter((t) => t.writable).map((t) => t.name));
    }
    showSetpointRange();
  }

  // Replaces a select's options, keeping the selection when it still exists.
  function fillSelect(select, names) {
    const keep = select.value;
    select.replaceChildren();
    names.forEach((n) => {
      const o = document.createElement('option');
      o.value = n;
      o.textContent = n;
      select.appendChild(o);
    });
    if (names.includes(keep)) {
      select.value = keep;
    }
  }

  async function refreshAlarms(gen) {
    const r = await api('GET', '/api/alarms');
    if (gen !== generation || sessionLost(r)) {
      return;
    }
    if (r.status !== 200 || !r.data || !Array.isArray(r.data.alarms)) {
      setStatus('Alarms unavailable: ' + errorText(r));
      return;
    }
    renderAlarms(r.data.alarms);
  }

  function renderAlarms(list) {
    const body = $('alarms-body');
    const seen = new Set();
    list.forEach((a) => {
      const key = a.tag + '-' + a.kind;
      seen.add(key);
      let row = alarmRows.get(key);
      if (!row) {
        row = document.createElement('tr');
        cell(row).textContent = a.tag;
        cell(row).textContent = a.kind;
        cell(row, 'num');
        cell(row, 'num');
        cell(row);
        cell(row);
        cell(row);
        alarmRows.set(key, row);
      }
      const c = row.children;
      c[2].textContent = fmt(a.limit);
      c[3].textContent = fmt(a.value);
      c[4].textContent = fmtTime(a.since_ms);
      const acked = typeof a.acked_by === 'string';
      c[5].textContent = (a.active ? 'active' : 'cleared') + (acked ? ', acknowledged by ' + a.acked_by : ', unacknowledged');
      row.className = a.active ? (acked ? 'alarm-acked' : 'alarm-active') : 'alarm-cleared';
      const button = c[6].querySelector('button');
      if (!acked && !button) {
        const b = document.createElement('button');
        b.type = 'button';
        b.id = 'ack-' + a.tag + '-' + a.kind;
        b.textContent = 'Acknowledge';
        b.addEventListener('click', () => acknowledge(a.tag, a.kind, b));
        c[6].appendChild(b);
      } else if (acked && button) {
        button.remove();
      }
      body.appendChild(row);
    });
    for (const [key, row] of alarmRows) {
      if (!seen.has(key)) {
        row.remove();
        alarmRows.delete(key);
      }
    }
    $('alarms-empty').hidden = list.length !== 0;
  }

  async function acknowledge(tag, kind, button) {
    button.disabled = true;
    const r = await api('POST', '/api/ack', { tag: tag, kind: kind });
    button.disabled = false;
    if (sessionLost(r)) {
      return;
    }
    if (r.status !== 200) {
      setStatus('Acknowledge ' + tag + ' ' + kind + ': ' + errorText(r));
    }
    refreshAlarms(generation);
  }

  // ------------------------------------------------------------------ setpoint

  function showSetpointRange() {
    const t = tags.find((x) => x.name === $('sp-tag').value);
    $('sp-range').textContent = t ? 'Current ' + fmt(t.value) + ' ' + (t.unit || '') +
      (t.min !== null || t.max !== null ? '; allowed ' + fmtRange(t) : '') : '';
  }

  async function writeSetpoint(ev) {
    ev.preventDefault();
    const verdict = $('sp-verdict');
    const tag = $('sp-tag').value;
    const raw = $('sp-value').value.trim();
    const value = Number(raw);
    verdict.className = '';
    if (!tag) {
      verdict.textContent = 'no writable tag';
      return;
    }
    if (raw === '' || !isFinite(value)) {
      verdict.textContent = 'enter a number';
      verdict.className = 'refused';
      return;
    }
    $('sp-write').disabled = true;
    verdict.textContent = '';
    const r = await api('POST', '/api/setpoint', { tag: tag, value: value });
    $('sp-write').disabled = false;
    if (sessionLost(r)) {
      return;
    }
    if (r.status === 200 && r.data && typeof r.data.accepted === 'boolean') {
      verdict.textContent = r.data.accepted ? 'accepted' : String(r.data.reason);
      verdict.className = r.data.accepted ? 'accepted' : 'refused';
    } else {
      verdict.textContent = errorText(r);
      verdict.className = 'refused';
    }
  }

  // ------------------------------------------------------------------ trend and export

  function rangeMs() {
    const v = Number($('trend-range').value);
    return isFinite(v) && v > 0 ? v : 3600000;
  }

  function updateCsvLink() {
    const to = Date.now();
    $('csv').href = '/api/export.csv?from=' + (to - rangeMs()) + '&to=' + to;
  }

  async function trendLoop(gen) {
    while (gen === generation) {
      await drawTrend(gen);
      await new Promise((resolve) => setTimeout(resolve, TREND_EVERY_MS));
    }
  }

  async function drawTrend(gen) {
    updateCsvLink();
    const tag = $('trend-tag').value;
    if (!tag) {
      plot([], 0, 1, '');
      return;
    }
    const seq = ++trendSeq;
    const to = Date.now();
    const from = to - rangeMs();
    const r = await api('GET', '/api/trend?tag=' + encodeURIComponent(tag) + '&from=' + from + '&to=' + to);
    if (gen !== generation || seq !== trendSeq || sessionLost(r)) {
      return;
    }
    if (r.status !== 200 || !r.data || !Array.isArray(r.data.points)) {
      $('trend-msg').textContent = 'Trend unavailable: ' + errorText(r);
      plot([], from, to, '');
      return;
    }
    const pts = r.data.points.filter((p) => Array.isArray(p) && typeof p[0] === 'number' && typeof p[1] === 'number');
    const t = tags.find((x) => x.name === tag);
    $('trend-msg').textContent = pts.length ? pts.length + ' points' : 'No data in this range.';
    plot(pts, from, to, t ? t.unit || '' : '');
  }

  function niceStep(raw) {
    if (!(raw > 0) || !isFinite(raw)) {
      return 1;
    }
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const n = raw / mag;
    return (n <= 1 ? 1 : n <= 2 ? 2 : n <= 5 ? 5 : 10) * mag;
  }

  function cssColor(name, fallback) {
    const v = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    return v || fallback;
  }

  function plot(points, from, to, unit) {
    const canvas = $('trend');
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(200, canvas.clientWidth || 720);
    const h = Math.max(120, canvas.clientHeight || 280);
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const g = canvas.getContext('2d');
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    g.fillStyle = cssColor('--plot-bg', '#fbfcfd');
    g.fillRect(0, 0, w, h);
    const left = 64;
    const right = 16;
    const top = 22;
    const bottom = 28;
    const pw = w - left - right;
    const ph = h - top - bottom;

    let lo = Infinity;
    let hi = -Infinity;
    points.forEach((p) => {
      lo = Math.min(lo, p[1]);
      hi = Math.max(hi, p[1]);
    });
    if (!isFinite(lo)) {
      lo = 0;
      hi = 1;
    } else if (lo === hi) {
      lo -= 1;
      hi += 1;
    }
    // Round the axis to 1, 2 or 5 times a power of ten, about five divisions.
    const step = niceStep((hi - lo) / 5);
    lo = Math.floor(lo / step) * step;
    hi = Math.ceil(hi / step) * step;
    const decimals = Math.max(0, Math.min(6, -Math.floor(Math.log10(step))));
    const span = Math.max(1, to - from);
    const x = (ts) => left + ((ts - from) / span) * pw;
    const y = (v) => top + (1 - (v - lo) / (hi - lo)) * ph;

    g.strokeStyle = cssColor('--grid', '#d5dbe1');
    g.fillStyle = cssColor('--muted', '#5b6670');
    g.lineWidth = 1;
    g.font = '11px system-ui, sans-serif';
    g.textAlign = 'right';
    g.textBaseline = 'middle';
    const divisions = Math.round((hi - lo) / step);
    for (let i = 0; i <= divisions; i++) {
      const v = lo + i * step;
      const yy = Math.round(y(v)) + 0.5;
      g.beginPath();
      g.moveTo(left, yy);
      g.lineTo(left + pw, yy);
      g.stroke();
      g.fillText(v.toFixed(decimals), left - 6, yy);
    }
    if (unit) {
      g.textBaseline = 'top';
      g.fillText(unit, left - 6, 2);
    }
    g.textBaseline = 'top';
    for (let i = 0; i <= 6; i++) {
      const ts = from + (span * i) / 6;
      const xx = Math.round(x(ts)) + 0.5;
      g.beginPath();
      g.moveTo(xx, top);
      g.lineTo(xx, top + ph);
      g.stroke();
      g.textAlign = i === 0 ? 'left' : i === 6 ? 'right' : 'center';
      g.fillText(fmtTime(ts), xx, top + ph + 6);
    }

    if (points.length) {
      g.strokeStyle = cssColor('--accent', '#1f6fb2');
      g.lineWidth = 2;
      g.lineJoin = 'round';
      g.beginPath();
      points.forEach((p, i) => {
        const px = x(p[0]);
        const py = y(p[1]);
        if (i === 0) {
          g.moveTo(px, py);
        } else {
          g.lineTo(px, py);
        }
      });
      g.stroke();
      if (points.length === 1) {
        g.fillStyle = g.strokeStyle;
        g.fillRect(x(points[0][0]) - 2, y(points[0][1]) - 2, 4, 4);
      }
    }
  }

  // ------------------------------------------------------------------ session

  async function login(ev) {
    ev.preventDefault();
    const user = $('user').value;
    const password = $('password').value;
    $('login').disabled = true;
    $('login-error').textContent = '';
    const r = await api('POST', '/api/login', { user: user, password: password });
    $('login').disabled = false;
    $('password').value = '';
    if (r.status === 200 && r.data && typeof r.data.user === 'string') {
      showApp(r.data.user);
    } else {
      $('login-error').textContent = errorText(r);
      $('password').focus();
    }
  }

  async function logout() {
    const r = await api('POST', '/api/logout', {});
    showLogin(r.status === 200 || r.status === 401 ? '' : 'Logout: ' + errorText(r));
  }

  async function start() {
    $('login-form').addEventListener('submit', login);
    $('logout').addEventListener('click', logout);
    $('sp-form').addEventListener('submit', writeSetpoint);
    $('sp-tag').addEventListener('change', showSetpointRange);
    $('trend-tag').addEventListener('change', () => drawTrend(generation));
    $('trend-range').addEventListener('change', () => drawTrend(generation));
    $('csv').addEventListener('click', updateCsvLink);
    window.addEventListener('resize', () => drawTrend(generation));
    updateCsvLink();
    // The login form is shown from the start (and left as it is, with whatever was typed
    // meanwhile) unless a session is still valid.
    const r = await api('GET', '/api/session');
    if (r.status === 200 && r.data && typeof r.data.user === 'string') {
      showApp(r.data.user);
    }
  }

  start();
})();
