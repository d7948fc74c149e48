/**
 * What the front end shows, decided from the server extension's usage report.
 *
 * Pure functions of the report (GET /api/gpuportal/usage, docs/extension.md) and of
 * what the front end already did, so the unit tests cover every rule without a browser.
 */

import { formatCountdown, formatCredits, formatDuration } from './format';

export interface IGpu {
  index: number;
  uuid: string;
  utilization_pct: number;
  memory_used_mib: number;
  memory_total_mib: number;
}

export interface IKernel {
  id: string;
  name: string;
  execution_state: string;
  last_activity: string | null;
  pid: number | null;
  gpu_memory_used_mib: number;
  gpu_utilization_pct: number;
}

export interface ISaveRequest {
  id: string;
  reason: string;
  requested_at: string;
  stop_at: string;
  deadline: string;
  acknowledged: boolean;
}

export interface IUsage {
  currency: string | null;
  price_per_hour: number | null;
  spent: number | null;
  balance: number | null;
  available: number | null;
  runway_seconds: number | null;
  warning: string | null;
  stopping_at: string | null;
  allocation: { gpu_count: number; stop_reason: string | null } | null;
  portal: { reachable: boolean; error: string | null; stale: boolean };
  nvml: { available: boolean; error: string | null };
  gpus: IGpu[];
  kernels: IKernel[];
  idle: {
    timeout_seconds: number;
    idle_seconds: number;
    shutdown_at: string | null;
  };
  save: ISaveRequest | null;
  topup_url: string;
  at: string;
}

export interface IStatus {
  /** The status bar's text. */
  text: string;
  /** A longer sentence for the tooltip and screen readers. */
  title: string;
  /** The figures are the last known ones: the portal (or this server) did not answer. */
  stale: boolean;
  /** A CPU-only server: nothing is billed. */
  free: boolean;
}

/**
 * The status bar item from the latest report; ``report`` null means this server's own
 * endpoint did not answer, and ``last`` holds the last report that did.
 */
export function statusOf(report: IUsage | null, last: IUsage | null): IStatus {
  const shown = report ?? last;
  if (shown === null) {
    return { text: 'GPU · …', title: 'Waiting for the first reading.', stale: true, free: false };
  }
  const serverDown = report === null;
  const portalDown = !shown.portal.reachable;
  const stale = serverDown || portalDown || shown.portal.stale;
  if (shown.allocation === null || shown.price_per_hour === null) {
    if (portalDown || serverDown) {
      return {
        text: 'GPU · portal unreachable',
        title: unreachableTitle(shown, serverDown),
        stale: true,
        free: false
      };
    }
    return { text: 'CPU · free', title: 'A CPU-only server: nothing is billed.', stale: false, free: true };
  }
  const parts = [
    `GPU ×${shown.allocation.gpu_count}`,
    `${formatCredits(shown.price_per_hour)}/h`
  ];
  if (shown.spent !== null) {
    parts.push(`spent ${formatCredits(shown.spent)}`);
  }
  if (shown.runway_seconds !== null) {
    parts.push(`${formatDuration(shown.runway_seconds)} left`);
  }
  let text = parts.join(' · ');
  let title = `${text}. Prices in ${shown.currency ?? 'credits'}; the portal's bill is what counts.`;
  if (stale) {
    text = `${text} (stale)`;
    title = `${unreachableTitle(shown, serverDown)} Last known: ${title}`;
  }
  return { text, title, stale, free: false };
}

function unreachableTitle(shown: IUsage, serverDown: boolean): string {
  if (serverDown) {
    return 'This server does not answer.';
  }
  return shown.portal.error ?? 'The portal cannot be reached.';
}

/**
 * Whether to open the low-runway dialog now. It opens once per warning: when the
 * portal sends a warning (its runway threshold) that differs from the one already
 * shown. A stop already scheduled is the save countdown's business, not the dialog's.
 */
export function warningToShow(report: IUsage | null, shownWarning: string | null): string | null {
  if (report === null || !report.warning || report.save !== null) {
    return null;
  }
  if (report.allocation === null) {
    return null;
  }
  // The portal's text names a time that moves; one dialog per episode, keyed by kind.
  return warningKey(report.warning) === warningKey(shownWarning) ? null : report.warning;
}

/** The kind of a warning: "stop" once the stop is scheduled, "low" before. */
export function warningKey(warning: string | null): string | null {
  if (!warning) {
    return null;
  }
  return warning.startsWith('Out of') ? 'stop' : 'low';
}

/** The save request to act on now, or null (none, already answered, or already handled). */
export function saveToHandle(report: IUsage | null, handledId: string | null): ISaveRequest | null {
  const save = report?.save ?? null;
  if (save === null || save.acknowledged || save.id === handledId) {
    return null;
  }
  return save;
}

/** Why the server stops, in a short plain sentence. */
export function stopReasonText(reason: string): string {
  switch (reason) {
    case 'out_of_credit':
      return 'Your credit ran out.';
    case 'quota_exhausted':
      return "Your team's budget ran out.";
    case 'idle':
      return 'Its GPU and kernels were idle for too long.';
    default:
      return 'The portal stopped it.';
  }
}

/** The countdown line: "Saving your work. This server stops in 0:45: your credit ran out." */
export function countdownText(save: ISaveRequest, now: Date): string {
  const left = (Date.parse(save.stop_at) - now.getTime()) / 1000;
  return `This server stops in ${formatCountdown(left)}. ${stopReasonText(save.reason)}`;
}

/** The idle timer: "This server stops in 12 min if the GPU stays idle." */
export function idleText(report: IUsage): string {
  if (!report.idle.shutdown_at || report.idle.timeout_seconds <= 0) {
    return 'Idle culling is off for this server.';
  }
  const left = (Date.parse(report.idle.shutdown_at) - Date.parse(report.at)) / 1000;
  return `This server stops in ${formatDuration(left)} if the GPU stays idle.`;
}

/** A link the front end may open: http(s) only, so a crafted report cannot run script. */
export function safeLink(url: string | null | undefined): string | null {
  if (!url) {
    return null;
  }
  try {
    const parsed = new URL(url);
    return parsed.protocol === 'https:' || parsed.protocol === 'http:' ? parsed.href : null;
  } catch {
    return null;
  }
}

/** A history of readings for a sparkline: the last ``size`` values, oldest first. */
export function pushSample(history: number[], value: number, size: number): number[] {
  const next = history.concat([Math.max(0, value)]);
  return next.length > size ? next.slice(next.length - size) : next;
}
