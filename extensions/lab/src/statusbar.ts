/** The status bar item: price per hour, spend and runway; a click opens the GPU panel. */

import { Widget } from '@lumino/widgets';

import { UsageModel } from './model';
import { statusOf } from './state';

export class CostStatus extends Widget {
  constructor(model: UsageModel, open: () => void) {
    super({ node: document.createElement('button') });
    this.addClass('jp-gpuportal-status');
    this.node.setAttribute('type', 'button');
    this.node.setAttribute('aria-live', 'polite');
    this.node.addEventListener('click', open);
    this._model = model;
    model.changed.connect(this.update, this);
    this.update();
  }

  update(): void {
    const status = statusOf(this._model.current, this._model.last);
    this.node.textContent = status.text;
    this.node.title = `${status.title} Click for the GPU panel.`;
    this.node.classList.toggle('jp-gpuportal-stale', status.stale);
    this.node.classList.toggle('jp-gpuportal-free', status.free);
    this.node.dataset.stale = String(status.stale);
  }

  private _model: UsageModel;
}
