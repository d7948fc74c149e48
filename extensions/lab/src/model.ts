/**
 * The usage model: polls /api/gpuportal/usage every few seconds and keeps the last
 * good report and a short history per GPU for the panel's charts.
 */

import { Signal, ISignal } from '@lumino/signaling';

import { fetchUsage } from './api';
import { IUsage, pushSample } from './state';

/** Seconds between readings; the server extension caches the portal for 5 s. */
export const POLL_SECONDS = 5;
/** Points kept per GPU chart: 10 minutes at one reading every POLL_SECONDS. */
export const HISTORY_POINTS = (10 * 60) / POLL_SECONDS;

export class UsageModel {
  /** The latest report, or null when the latest poll failed. */
  current: IUsage | null = null;
  /** The last report that arrived. */
  last: IUsage | null = null;
  /** Per GPU index: utilisation (percent) and memory (percent of total) over time. */
  utilization = new Map<number, number[]>();
  memory = new Map<number, number[]>();

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  start(): void {
    if (this._timer === null) {
      void this.refresh();
      this._timer = window.setInterval(() => void this.refresh(), POLL_SECONDS * 1000);
    }
  }

  stop(): void {
    if (this._timer !== null) {
      window.clearInterval(this._timer);
      this._timer = null;
    }
  }

  async refresh(): Promise<void> {
    if (this._busy) {
      return; // one reading in flight at a time
    }
    this._busy = true;
    try {
      const report = await fetchUsage();
      this.current = report;
      this.last = report;
      for (const gpu of report.gpus) {
        const total = gpu.memory_total_mib || 1;
        this.utilization.set(
          gpu.index,
          pushSample(this.utilization.get(gpu.index) ?? [], gpu.utilization_pct, HISTORY_POINTS)
        );
        this.memory.set(
          gpu.index,
          pushSample(
            this.memory.get(gpu.index) ?? [],
            (100 * gpu.memory_used_mib) / total,
            HISTORY_POINTS
          )
        );
      }
    } catch {
      this.current = null;
    } finally {
      this._busy = false;
    }
    this._changed.emit();
  }

  private _busy = false;
  private _timer: number | null = null;
  private _changed = new Signal<this, void>(this);
}
