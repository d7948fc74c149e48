/**
 * The only server this front end talks to: its own jupyter-server's /api/gpuportal/*.
 *
 * ServerConnection adds what jupyter-server requires (the XSRF header from the
 * cookie, or the token); nothing here calls the portal or any other host.
 */

import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { IUsage } from './state';

async function call(path: string, init: RequestInit): Promise<unknown> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'api/gpuportal', path);
  const reply = await ServerConnection.makeRequest(url, init, settings);
  if (!reply.ok) {
    throw new ServerConnection.ResponseError(reply);
  }
  return reply.json();
}

/** GET /api/gpuportal/usage. */
export async function fetchUsage(): Promise<IUsage> {
  return (await call('usage', { method: 'GET' })) as IUsage;
}

/** POST /api/gpuportal/save-ack: the open documents were saved for request ``id``. */
export async function acknowledgeSave(
  id: string,
  saved: string[],
  failed: string[]
): Promise<boolean> {
  const body = JSON.stringify({ id, saved, failed });
  const answer = (await call('save-ack', { method: 'POST', body })) as { acknowledged: boolean };
  return answer.acknowledged;
}
