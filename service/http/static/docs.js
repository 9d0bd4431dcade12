// The API reference: Swagger UI (BentoML's bundled copy, served by this service) drawing
// /docs.json. No validator badge (it would call validator.swagger.io) and no top bar.
window.addEventListener("DOMContentLoaded", () => {
  window.ui = window.SwaggerUIBundle({
    url: "/docs.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [window.SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
