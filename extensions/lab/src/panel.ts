/**
 * The GPU side panel: each GPU with its utilisation and memory over the last minutes,
 * each kernel with its notebook, GPU memory, utilisation and whether it is idle, and
 * the idle timer.
 */

import { Widget } from '@lumino/widgets';

import { el, sparkline } from './dom';
import { UsageModel } from './model';
import { idleText, IKernel, statusOf } from './state';

/** A kernel id → the notebook (or console) path it belongs to. */
export type KernelPaths = () => Map<string, string>;

export class GpuPanel extends Widget {
  constructor(model: UsageModel, kernelPaths: KernelPaths) {
    super();
    this.id = 'gpuportal-panel';
    this.addClass('jp-gpuportal-panel');
    this.title.caption = 'GPU use and cost';
    this.title.label = 'GPU';
    this.node.tabIndex = 0;
    this._model = model;
    this._kernelPaths = kernelPaths;
    model.changed.connect(this.render, this);
    this.render();
  }

  render(): void {
    const model = this._model;
    const report = model.current ?? model.last;
    const body = el('div', 'jp-gpuportal-panel-body');
    body.appendChild(el('h2', '', 'GPU use and cost'));
    const status = statusOf(model.current, model.last);
    body.appendChild(el('p', 'jp-gpuportal-panel-cost', status.text));
    if (report === null) {
      body.appendChild(el('p', '', 'Waiting for the first reading.'));
      this.node.replaceChildren(body);
      return;
    }
    body.appendChild(el('p', 'jp-gpuportal-idle', idleText(report)));

    body.appendChild(el('h3', '', 'GPUs'));
    if (!report.nvml.available) {
      body.appendChild(el('p', '', report.nvml.error ?? 'No GPU readings on this server.'));
    }
    const gpus = el('ul', 'jp-gpuportal-gpus');
    for (const gpu of report.gpus) {
      const item = el('li', 'jp-gpuportal-gpu');
      const used = (gpu.memory_used_mib / 1024).toFixed(1);
      const total = (gpu.memory_total_mib / 1024).toFixed(0);
      item.appendChild(
        el('div', '', `GPU ${gpu.index}: ${gpu.utilization_pct}% · ${used} / ${total} GiB`)
      );
      for (const [name, history] of [
        ['use', model.utilization.get(gpu.index) ?? []],
        ['memory', model.memory.get(gpu.index) ?? []]
      ] as [string, number[]][]) {
        const chart = el('div', 'jp-gpuportal-chart');
        chart.appendChild(el('span', 'jp-gpuportal-chart-label', name));
        chart.appendChild(sparkline(history, `GPU ${gpu.index} ${name}, last 10 minutes`));
        item.appendChild(chart);
      }
      gpus.appendChild(item);
    }
    body.appendChild(gpus);

    body.appendChild(el('h3', '', 'Kernels'));
    const paths = this._kernelPaths();
    if (report.kernels.length === 0) {
      body.appendChild(el('p', '', 'No kernel is running.'));
    }
    const list = el('ul', 'jp-gpuportal-kernels');
    for (const kernel of report.kernels) {
      list.appendChild(this._kernelItem(kernel, paths.get(kernel.id)));
    }
    body.appendChild(list);
    this.node.replaceChildren(body);
  }

  private _kernelItem(kernel: IKernel, path: string | undefined): HTMLLIElement {
    const item = el('li', 'jp-gpuportal-kernel');
    item.dataset.kernelId = kernel.id;
    const computing = kernel.execution_state === 'busy' || kernel.gpu_utilization_pct > 0;
    item.appendChild(el('div', 'jp-gpuportal-kernel-path', path ?? `${kernel.name} (no notebook)`));
    const memory = (kernel.gpu_memory_used_mib / 1024).toFixed(1);
    item.appendChild(
      el(
        'div',
        'jp-gpuportal-kernel-use',
        `GPU memory ${memory} GiB · GPU use ${kernel.gpu_utilization_pct}% · ${computing ? 'busy' : 'idle'}`
      )
    );
    return item;
  }

  private _model: UsageModel;
  private _kernelPaths: KernelPaths;
}
