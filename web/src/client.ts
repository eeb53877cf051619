// One Connect transport for the whole app, the bearer token (entered once, kept in this
// browser), and what an error means to the person looking at the page.
import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-web";
import { useSyncExternalStore } from "react";

const TOKEN_KEY = "kfeed.token";

type Listener = () => void;

/** A tiny observable value, read by components through useSyncExternalStore. */
export class Store<T> {
  private listeners = new Set<Listener>();
  constructor(private value: T) {}
  get = (): T => this.value;
  set(value: T): void {
    if (Object.is(value, this.value)) return;
    this.value = value;
    for (const listener of this.listeners) listener();
  }
  subscribe = (listener: Listener): (() => void) => {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  };
}

export function useStore<T>(store: Store<T>): T {
  return useSyncExternalStore(store.subscribe, store.get);
}

function readToken(): string {
  try {
    return window.localStorage.getItem(TOKEN_KEY) ?? "";
  } catch {
    return "";
  }
}

export const token = new Store<string>(readToken());

export function saveToken(value: string): void {
  const trimmed = value.trim();
  try {
    if (trimmed) window.localStorage.setItem(TOKEN_KEY, trimmed);
    else window.localStorage.removeItem(TOKEN_KEY);
  } catch {
    // Private mode: the token lasts for this page only.
  }
  token.set(trimmed);
}

/** What the app knows of the server: fine, wants a (valid) token, or cannot be reached. */
export type Connection = "ok" | "needs-token" | "bad-token" | "down";
export const connection = new Store<Connection>("ok");

export type Problem = "unauthenticated" | "down" | "unimplemented" | "other";

export function classify(error: unknown): Problem {
  const connectError = ConnectError.from(error);
  switch (connectError.code) {
    case Code.Unauthenticated:
    case Code.PermissionDenied:
      return "unauthenticated";
    case Code.Unimplemented:
      return "unimplemented";
    case Code.Unavailable:
      return "down";
    case Code.Unknown:
    case Code.Internal:
      // fetch() itself failed (connection refused, reset): no answer from kfeed at all.
      return /fetch|network|load failed|HTTP 50[234]/i.test(connectError.rawMessage)
        ? "down"
        : "other";
    default:
      return "other";
  }
}

/** Tell the app shell about an error (token prompt, server-down banner). */
export function noteError(error: unknown): void {
  const problem = classify(error);
  if (problem === "unauthenticated") connection.set(token.get() ? "bad-token" : "needs-token");
  else if (problem === "down") connection.set("down");
}

export function noteSuccess(): void {
  if (connection.get() !== "ok") connection.set("ok");
}

const bearer: Interceptor = (next) => async (request) => {
  const current = token.get();
  if (current) request.header.set("authorization", `Bearer ${current}`);
  try {
    const response = await next(request);
    if (!response.stream) noteSuccess();
    return response;
  } catch (error) {
    noteError(error);
    throw error;
  }
};

export const transport = createConnectTransport({
  baseUrl: window.location.origin,
  useBinaryFormat: true,
  interceptors: [bearer],
});
