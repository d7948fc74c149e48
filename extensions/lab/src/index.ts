/**
 * gpuportal in JupyterLab: the cost status bar item, the GPU panel, and the guard that
 * warns on low credit and saves every open document before a stop.
 */

import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { IStatusBar } from '@jupyterlab/statusbar';

import { WorkGuard } from './guard';
import { UsageModel } from './model';
import { GpuPanel } from './panel';
import { CostStatus } from './statusbar';

const OPEN_PANEL = 'gpuportal:open-panel';

const plugin: JupyterFrontEndPlugin<void> = {
  id: '@gpuportal/jupyterlab:plugin',
  description: 'Price, spend and runway in the status bar, a GPU panel, saving before a stop.',
  autoStart: true,
  optional: [IStatusBar],
  activate: (app: JupyterFrontEnd, statusBar: IStatusBar | null) => {
    const model = new UsageModel();
    const kernelPaths = () => {
      const paths = new Map<string, string>();
      for (const session of app.serviceManager.sessions.running()) {
        if (session.kernel) {
          paths.set(session.kernel.id, session.path);
        }
      }
      return paths;
    };
    const panel = new GpuPanel(model, kernelPaths);
    app.shell.add(panel, 'right', { rank: 900 });
    app.commands.addCommand(OPEN_PANEL, {
      label: 'Show the GPU panel',
      execute: () => app.shell.activateById(panel.id)
    });
    if (statusBar) {
      statusBar.registerStatusItem('@gpuportal/jupyterlab:status', {
        item: new CostStatus(model, () => void app.commands.execute(OPEN_PANEL)),
        align: 'left',
        rank: 0
      });
    }
    new WorkGuard(app, model);
    model.start();
  }
};

export default plugin;
