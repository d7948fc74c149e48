import {
  countdownText,
  idleText,
  IUsage,
  pushSample,
  safeLink,
  saveToHandle,
  statusOf,
  warningKey,
  warningToShow
} from '../src/state';

function usage(over: Partial<IUsage> = {}): IUsage {
  return {
    currency: 'credits',
    price_per_hour: 1_200_000,
    spent: 341_999,
    balance: 4_000_000,
    available: 3_840_000,
    runway_seconds: 3 * 3600 + 12 * 60 + 5,
    warning: null,
    stopping_at: null,
    allocation: { gpu_count: 1, stop_reason: null },
    portal: { reachable: true, error: null, stale: false },
    nvml: { available: true, error: null },
    gpus: [],
    kernels: [],
    idle: { timeout_seconds: 1800, idle_seconds: 60, shutdown_at: '2026-01-01T00:29:00+00:00' },
    save: null,
    topup_url: 'https://hub.example.org/services/portal/docs',
    at: '2026-01-01T00:00:00+00:00',
    ...over
  };
}

describe('the status bar', () => {
  it('shows price per hour, spend and runway', () => {
    expect(statusOf(usage(), null)).toEqual({
      text: 'GPU ×1 · 1.20/h · spent 0.34 · 3 h 12 min left',
      title: 'GPU ×1 · 1.20/h · spent 0.34 · 3 h 12 min left. Prices in credits; the portal\'s bill is what counts.',
      stale: false,
      free: false
    });
  });

  it('shows CPU · free without an allocation', () => {
    const cpu = usage({ allocation: null, price_per_hour: null, spent: null });
    expect(statusOf(cpu, null)).toMatchObject({ text: 'CPU · free', stale: false, free: true });
  });

  it('marks the last figures stale when the portal cannot be reached', () => {
    const down = usage({ portal: { reachable: false, error: 'Portal unreachable: ConnectError.', stale: true } });
    const status = statusOf(down, null);
    expect(status.text).toBe('GPU ×1 · 1.20/h · spent 0.34 · 3 h 12 min left (stale)');
    expect(status.stale).toBe(true);
    expect(status.title.startsWith('Portal unreachable: ConnectError.')).toBe(true);
  });

  it('says so when the portal never answered', () => {
    const never = usage({
      allocation: null,
      price_per_hour: null,
      spent: null,
      portal: { reachable: false, error: 'x', stale: false }
    });
    expect(statusOf(never, null)).toMatchObject({ text: 'GPU · portal unreachable', stale: true });
  });

  it('keeps the last report, marked stale, when this server does not answer', () => {
    expect(statusOf(null, usage())).toMatchObject({ stale: true, text: 'GPU ×1 · 1.20/h · spent 0.34 · 3 h 12 min left (stale)' });
    expect(statusOf(null, null)).toMatchObject({ text: 'GPU · …', stale: true });
  });
});

describe('the low-runway dialog', () => {
  const low = 'Your credit runs out in about 8 min; your servers stop when it does. Add credits to keep them running.';
  const out = 'Out of credits: your servers stop at 2026-01-01T00:02:00+00:00. Save your work, or add credits now.';

  it('opens when the portal warns, once per kind of warning', () => {
    expect(warningToShow(usage(), null)).toBeNull();
    expect(warningToShow(usage({ warning: low }), null)).toBe(low);
    const later = low.replace('8 min', '7 min');
    expect(warningToShow(usage({ warning: later }), low)).toBeNull();
    expect(warningToShow(usage({ warning: out }), low)).toBe(out);
  });

  it('does not open on a CPU server, without a report, or while a save is pending', () => {
    expect(warningToShow(usage({ warning: low, allocation: null }), null)).toBeNull();
    expect(warningToShow(null, null)).toBeNull();
    const save = { id: 'a', reason: 'out_of_credit', requested_at: '', stop_at: '', deadline: '', acknowledged: false };
    expect(warningToShow(usage({ warning: out, save }), null)).toBeNull();
  });

  it('knows a warning kind', () => {
    expect([warningKey(null), warningKey(low), warningKey(out)]).toEqual([null, 'low', 'stop']);
  });
});

describe('the save before a stop', () => {
  const save = {
    id: 'r1',
    reason: 'out_of_credit',
    requested_at: '2026-01-01T00:00:00+00:00',
    stop_at: '2026-01-01T00:01:05+00:00',
    deadline: '2026-01-01T00:00:30+00:00',
    acknowledged: false
  };

  it('is handled once per request, and not once acknowledged', () => {
    expect(saveToHandle(usage({ save }), null)).toEqual(save);
    expect(saveToHandle(usage({ save }), 'r1')).toBeNull();
    expect(saveToHandle(usage({ save: { ...save, acknowledged: true } }), null)).toBeNull();
    expect(saveToHandle(usage(), null)).toBeNull();
    expect(saveToHandle(null, null)).toBeNull();
  });

  it('counts down to the stop with its reason', () => {
    expect(countdownText(save, new Date('2026-01-01T00:00:00Z'))).toBe(
      'This server stops in 1:05. Your credit ran out.'
    );
    expect(countdownText({ ...save, reason: 'idle' }, new Date('2026-01-01T00:02:00Z'))).toBe(
      'This server stops in 0:00. Its GPU and kernels were idle for too long.'
    );
  });
});

describe('the panel', () => {
  it('tells the idle timer', () => {
    expect(idleText(usage())).toBe('This server stops in 29 min if the GPU stays idle.');
    expect(idleText(usage({ idle: { timeout_seconds: 0, idle_seconds: 1, shutdown_at: null } }))).toBe(
      'Idle culling is off for this server.'
    );
  });

  it('keeps a bounded history per GPU', () => {
    let history: number[] = [];
    for (const v of [10, 20, 30, -5]) {
      history = pushSample(history, v, 3);
    }
    expect(history).toEqual([20, 30, 0]);
  });
});

describe('links from a report', () => {
  it.each([
    ['https://hub.example.org/topup', 'https://hub.example.org/topup'],
    ['javascript:alert(1)', null],
    ['data:text/html,<b>x</b>', null],
    ['not a url', null],
    ['', null]
  ])('%p opens as %p', (url, expected) => {
    expect(safeLink(url)).toBe(expected);
  });
});
