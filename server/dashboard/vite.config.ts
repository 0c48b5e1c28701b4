// Builds the dashboard into the Python package (served by sira-server, committed).
import tailwindcss from "@tailwindcss/vite";
import react from "@vitejs/plugin-react";
import { defineConfig } from "vite";

export default defineConfig({
  plugins: [react(), tailwindcss()],
  base: "/",
  build: {
    outDir: "../sira_server/web/dist",
    emptyOutDir: true,
    // The CSP allows no inline code: keep every asset a file (no data: URLs).
    assetsInlineLimit: 0,
    modulePreload: { polyfill: false },
    chunkSizeWarningLimit: 1500,
  },
  server: {
    // `npx vite` for development: forward RPCs and the dev sign-in to a local sira-server.
    proxy: {
      "/sira.experiments.v1.": "http://127.0.0.1:8080",
      "/dev/": "http://127.0.0.1:8080",
    },
  },
});
