// Vite build of the dashboard (`make web` → dist/, served by `kfeed serve --web-listen` at /).
// The kfeed.v1 code is the protoc-gen-es output of `make gen` in clients/typescript.
import { fileURLToPath } from "node:url";
import { defineConfig } from "vite";

const generated = fileURLToPath(new URL("../clients/typescript/src/gen", import.meta.url));

export default defineConfig({
  base: "./",
  resolve: {
    alias: { "@gen": generated },
    // The generated files live outside web/: they must share web/'s single protobuf runtime.
    dedupe: ["@bufbuild/protobuf"],
  },
  esbuild: { jsx: "automatic" },
  build: {
    outDir: "dist",
    emptyOutDir: true,
    sourcemap: false,
    chunkSizeWarningLimit: 1500,
    rollupOptions: {
      // TanStack Query's "use client" directives mean nothing outside React Server Components.
      onwarn(warning, warn) {
        if (warning.code !== "MODULE_LEVEL_DIRECTIVE") warn(warning);
      },
    },
  },
  server: {
    fs: { allow: [".", "../clients/typescript/src/gen"] },
    // `npm run dev`: the RPCs go to a local `kfeed serve --web-listen 127.0.0.1:8080`.
    proxy: {
      "/kfeed.v1.": "http://127.0.0.1:8080",
      "/metrics": "http://127.0.0.1:8080",
    },
  },
});
