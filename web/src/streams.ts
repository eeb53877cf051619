// Server streams in the browser: open, deliver each message, reconnect after a failure with the
// last resume token (no gap, no duplicate), stop when the component goes away.
import { ConnectError } from "@connectrpc/connect";
import { useEffect, useRef, useState } from "react";
import { classify, noteError, noteSuccess } from "./client";

export type StreamState = "connecting" | "live" | "unavailable" | "failed";

interface Resumable {
  resumeToken?: string;
}

/**
 * Keeps `open(signal, resumeToken)` streaming while the component is mounted and `key` is
 * unchanged. `onMessage` sees every message; the latest resume token is passed on reconnect.
 */
export function useServerStream<M extends Resumable>(
  key: string,
  open: (signal: AbortSignal, resumeToken: string) => AsyncIterable<M>,
  onMessage: (message: M) => void,
  enabled = true,
  /** A message after which the stream has nothing more to say (no reconnect once it ends). */
  isLast: (message: M) => boolean = () => false,
): { state: StreamState; error?: string } {
  const [state, setState] = useState<StreamState>("connecting");
  const [error, setError] = useState<string>();
  const handler = useRef(onMessage);
  handler.current = onMessage;
  const opener = useRef(open);
  opener.current = open;
  const last = useRef(isLast);
  last.current = isLast;

  useEffect(() => {
    if (!enabled) return;
    const abort = new AbortController();
    let resumeToken = "";
    let attempt = 0;
    let finished = false;
    setState("connecting");
    setError(undefined);
    (async () => {
      while (!abort.signal.aborted) {
        try {
          let first = true;
          for await (const message of opener.current(abort.signal, resumeToken)) {
            if (first) {
              first = false;
              attempt = 0;
              setState("live");
              noteSuccess();
            }
            if (message.resumeToken) resumeToken = message.resumeToken;
            handler.current(message);
            if (last.current(message)) finished = true;
          }
          if (abort.signal.aborted || finished) return;
        } catch (caught) {
          if (abort.signal.aborted) return;
          const problem = classify(caught);
          noteError(caught);
          if (problem === "unimplemented") {
            setState("unavailable");
            return;
          }
          setState("failed");
          setError(ConnectError.from(caught).rawMessage);
          if (problem === "unauthenticated") return; // the token prompt restarts the page
        }
        attempt += 1;
        await new Promise((resolve) => setTimeout(resolve, Math.min(10_000, 500 * 2 ** attempt)));
      }
    })();
    return () => abort.abort();
  }, [key, enabled]);

  return { state, error };
}
