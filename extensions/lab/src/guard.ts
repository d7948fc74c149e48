/**
 * Warnings that protect work: the low-runway dialog, the save before a stop (with its
 * countdown), and the page shown once the server has stopped.
 */

import { JupyterFrontEnd } from '@jupyterlab/application';
import { Dialog, showDialog } from '@jupyterlab/apputils';
import { PageConfig } from '@jupyterlab/coreutils';
import { Widget } from '@lumino/widgets';

import { acknowledgeSave } from './api';
import { el } from './dom';
import { formatCredits, formatDuration } from './format';
import { UsageModel } from './model';
import {
  countdownText,
  ISaveRequest,
  safeLink,
  saveToHandle,
  stopReasonText,
  warningToShow
} from './state';

/** What a document widget offers for saving (a DocumentWidget's context). */
interface ISavable {
  path: string;
  model: { dirty: boolean; readOnly?: boolean };
  save(): Promise<void>;
}

/** Saves every open, modified document; returns the paths saved and those that failed. */
export async function saveOpenDocuments(
  app: JupyterFrontEnd
): Promise<{ saved: string[]; failed: string[] }> {
  const contexts = new Map<string, ISavable>();
  for (const widget of app.shell.widgets('main')) {
    const context = (widget as unknown as { context?: ISavable }).context;
    if (context && typeof context.save === 'function' && context.model && context.path) {
      contexts.set(context.path, context);
    }
  }
  const saved: string[] = [];
  const failed: string[] = [];
  await Promise.all(
    Array.from(contexts.values()).map(async context => {
      if (!context.model.dirty || context.model.readOnly) {
        return;
      }
      try {
        await context.save();
        saved.push(context.path);
      } catch {
        failed.push(context.path);
      }
    })
  );
  return { saved: saved.sort(), failed: failed.sort() };
}

export class WorkGuard {
  constructor(app: JupyterFrontEnd, model: UsageModel) {
    this._app = app;
    this._model = model;
    model.changed.connect(this._onChange, this);
  }

  private _onChange(): void {
    const report = this._model.current;
    const save = saveToHandle(report, this._handled);
    if (save !== null) {
      this._handled = save.id;
      this._request = save;
      void this._save(save);
    }
    if (this._request !== null && report === null) {
      this._showStopped(); // the server went away after announcing its stop
      return;
    }
    const warning = warningToShow(report, this._warned);
    if (warning !== null && report !== null) {
      this._warned = warning;
      void this._warn(warning, report.runway_seconds, report.topup_url);
    }
  }

  private async _save(request: ISaveRequest): Promise<void> {
    this._showBanner();
    this._bannerText = 'Saving your work…';
    const { saved, failed } = await saveOpenDocuments(this._app);
    this._bannerText =
      failed.length > 0
        ? `Could not save: ${failed.join(', ')}.`
        : `Your work is saved (${saved.length} ${saved.length === 1 ? 'file' : 'files'}).`;
    this._tick();
    try {
      await acknowledgeSave(request.id, saved, failed);
    } catch {
      // The stop goes ahead at its bound anyway; nothing more to do here.
    }
  }

  private _showBanner(): void {
    if (this._banner !== null) {
      return;
    }
    this._banner = el('div', 'jp-gpuportal-banner');
    this._banner.setAttribute('role', 'alert');
    document.body.appendChild(this._banner);
    this._countdown = window.setInterval(() => this._tick(), 1000);
    this._tick();
  }

  private _tick(): void {
    if (this._banner === null || this._request === null) {
      return;
    }
    this._banner.textContent = `${countdownText(this._request, new Date())} ${this._bannerText}`;
  }

  private _showStopped(): void {
    if (this._stopped || this._request === null) {
      return;
    }
    this._stopped = true;
    if (this._countdown !== null) {
      window.clearInterval(this._countdown);
    }
    this._banner?.remove();
    this._model.stop();
    const last = this._model.last;
    const page = el('div', 'jp-gpuportal-stopped');
    page.setAttribute('role', 'alertdialog');
    page.setAttribute('aria-labelledby', 'gpuportal-stopped-title');
    const box = el('div', 'jp-gpuportal-stopped-box');
    const title = el('h1', '', 'Your server stopped');
    title.id = 'gpuportal-stopped-title';
    box.appendChild(title);
    box.appendChild(el('p', '', stopReasonText(this._request.reason)));
    if (last !== null && last.spent !== null) {
      box.appendChild(
        el('p', '', `This session cost ${formatCredits(last.spent)} ${last.currency ?? 'credits'}.`)
      );
    }
    box.appendChild(el('p', '', this._bannerText));
    const hubPrefix = PageConfig.getOption('hubPrefix');
    if (hubPrefix) {
      const home = el('a', 'jp-gpuportal-link', 'Back to the hub');
      home.href = PageConfig.getOption('hubHost') + hubPrefix + 'home';
      box.appendChild(home);
    }
    page.appendChild(box);
    document.body.appendChild(page);
    (box.querySelector('a') ?? title).focus();
  }

  private async _warn(warning: string, runway: number | null, topup: string): Promise<void> {
    const body = el('div', 'jp-gpuportal-dialog');
    body.appendChild(el('p', '', warning));
    if (runway !== null) {
      body.appendChild(el('p', 'jp-gpuportal-dialog-left', `Time left: ${formatDuration(runway)}.`));
    }
    const link = safeLink(topup);
    if (link !== null) {
      const anchor = el('a', 'jp-gpuportal-link', 'Add credits');
      anchor.href = link;
      anchor.target = '_blank';
      anchor.rel = 'noopener noreferrer';
      body.appendChild(anchor);
    }
    await showDialog({
      title: 'Credit running low',
      body: new Widget({ node: body }),
      buttons: [Dialog.okButton({ label: 'OK' })]
    });
  }

  private _app: JupyterFrontEnd;
  private _model: UsageModel;
  private _handled: string | null = null;
  private _request: ISaveRequest | null = null;
  private _warned: string | null = null;
  private _banner: HTMLDivElement | null = null;
  private _bannerText = '';
  private _countdown: number | null = null;
  private _stopped = false;
}
