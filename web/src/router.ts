// Hash routes (#/markets, #/market/TICKER, #/backtests/ID, #/status): the server only has to
// serve index.html at /.
import { useSyncExternalStore } from "react";

function current(): string[] {
  const path = window.location.hash.replace(/^#\/?/, "");
  return path ? path.split("/").map(decodeURIComponent) : [];
}

let route = current();
const listeners = new Set<() => void>();
window.addEventListener("hashchange", () => {
  route = current();
  for (const listener of listeners) listener();
});

export function useRoute(): string[] {
  return useSyncExternalStore(
    (listener) => {
      listeners.add(listener);
      return () => listeners.delete(listener);
    },
    () => route,
  );
}

export function href(...parts: string[]): string {
  return "#/" + parts.map(encodeURIComponent).join("/");
}

export function navigate(...parts: string[]): void {
  window.location.hash = href(...parts);
}
